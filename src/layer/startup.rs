//! The files every container of an image reads before its workload does anything, known from the
//! image alone: the program its config names (found through `PATH` and symlinks across the
//! layers, whiteouts honoured), the dynamic loader's cache, and the user database the runtime
//! reads at create. Resolved once per image over all its TOCs; each layer's mount prefetches its
//! share (see [`crate::fetch::LayerReader::prefetch_startup_files`]).

use std::collections::{HashMap, VecDeque};

use crate::estargz::{Entry, EntryKind, LayerToc};
use crate::image::ProcessConfig;

use super::unpack::{OPAQUE_MARKER, WHITEOUT_PREFIX};

/// Read at the start of (nearly) every container whatever it runs: the runtime resolves the
/// process's user and groups from `/etc/passwd` and `/etc/group` at create, and a dynamically
/// linked program's loader reads `/etc/ld.so.cache`.
const READ_BY_EVERY_START: &[&str] = &["/etc/passwd", "/etc/group", "/etc/ld.so.cache"];

/// Symlinks followed while resolving one path before giving up (Linux's limit).
const MAX_SYMLINK_HOPS: usize = 40;

/// The regular files a container of the image reads first, per layer of `layers` (top first):
/// `result[n]` holds paths of `layers[n]`'s files (as its TOC names them), the program first. A layer given as
/// `None` (not lazily pullable) is taken to hold nothing: a path it shadows may be listed in a
/// layer below, which costs a fetch, never a wrong read.
pub fn startup_files(process: &ProcessConfig, layers: &[Option<&LayerToc>]) -> Vec<Vec<String>> {
    let stack = Stack::new(layers);
    let mut files = vec![Vec::new(); layers.len()];
    let program = process
        .program_candidates()
        .into_iter()
        .find_map(|path| stack.resolve_file(&path));
    let always = READ_BY_EVERY_START
        .iter()
        .filter_map(|path| stack.resolve_file(path));
    for (layer, path) in program.into_iter().chain(always) {
        if !files[layer].contains(&path) {
            files[layer].push(path);
        }
    }
    files
}

/// What a layer says about a path.
enum Found<'a> {
    Entry(&'a Entry),
    /// A whiteout (of the path itself, or an opaque directory above it) hides lower layers.
    Hidden,
    Absent,
}

/// The layers' entries by path, top layer first.
struct Stack<'a> {
    layers: Vec<HashMap<&'a str, &'a Entry>>,
}

impl<'a> Stack<'a> {
    fn new(layers: &[Option<&'a LayerToc>]) -> Stack<'a> {
        let layers = layers
            .iter()
            .map(|toc| {
                toc.map(|toc| {
                    toc.entries()
                        .iter()
                        .map(|entry| (entry.path.as_str(), entry))
                        .collect()
                })
                .unwrap_or_default()
            })
            .collect();
        Stack { layers }
    }

    /// The topmost entry at `path` (normalized, relative) and its layer, as the merged root
    /// filesystem shows it.
    fn find(&self, path: &str) -> Option<(usize, &'a Entry)> {
        for (at, layer) in self.layers.iter().enumerate() {
            match Self::in_layer(layer, path) {
                Found::Entry(entry) => return Some((at, entry)),
                Found::Hidden => return None,
                Found::Absent => {}
            }
        }
        None
    }

    fn in_layer(layer: &HashMap<&'a str, &'a Entry>, path: &str) -> Found<'a> {
        if let Some(entry) = layer.get(path) {
            return Found::Entry(entry);
        }
        let (parent, name) = path.rsplit_once('/').unwrap_or(("", path));
        let whiteout = join(parent, &format!("{WHITEOUT_PREFIX}{name}"));
        if layer.contains_key(whiteout.as_str()) {
            return Found::Hidden;
        }
        let mut dir = parent;
        loop {
            if layer.contains_key(join(dir, OPAQUE_MARKER).as_str()) {
                return Found::Hidden;
            }
            match dir.rsplit_once('/') {
                Some((up, _)) => dir = up,
                None if dir.is_empty() => return Found::Absent,
                None => dir = "",
            }
        }
    }

    /// The regular file absolute `path` names in the merged filesystem, following symlinks
    /// (in any component) and hard links: its layer and its path there.
    fn resolve_file(&self, path: &str) -> Option<(usize, String)> {
        let mut pending: VecDeque<String> = components(path).collect();
        let mut resolved: Vec<String> = Vec::new();
        let mut hops = 0;
        while let Some(component) = pending.pop_front() {
            if component == ".." {
                resolved.pop();
                continue;
            }
            resolved.push(component);
            let here = resolved.join("/");
            let Some((layer, entry)) = self.find(&here) else {
                if pending.is_empty() {
                    return None;
                }
                // A directory some tars leave implicit.
                continue;
            };
            match entry.kind {
                EntryKind::Dir => {}
                EntryKind::Symlink => {
                    hops += 1;
                    let target = entry.link_target.as_deref()?;
                    if hops > MAX_SYMLINK_HOPS || target.is_empty() {
                        return None;
                    }
                    resolved.pop();
                    if target.starts_with('/') {
                        resolved.clear();
                    }
                    for part in components(target).collect::<Vec<_>>().into_iter().rev() {
                        pending.push_front(part);
                    }
                }
                EntryKind::Reg if pending.is_empty() => return Some((layer, here)),
                EntryKind::Hardlink if pending.is_empty() => {
                    return Some((layer, entry.link_target.clone()?));
                }
                _ => return None,
            }
        }
        None
    }
}

/// The non-empty, non-`.` components of `path`.
fn components(path: &str) -> impl Iterator<Item = String> + '_ {
    path.split('/')
        .filter(|part| !part.is_empty() && *part != ".")
        .map(str::to_string)
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::estargz::footer::Footer;
    use crate::estargz::{layer_from_toc_json, Toc, TocEntry};

    fn entry(name: &str, kind: &str, link: &str) -> TocEntry {
        TocEntry {
            name: name.into(),
            kind: kind.into(),
            link_name: link.into(),
            mode: 0o755,
            ..TocEntry::default()
        }
    }

    fn layer(entries: Vec<TocEntry>) -> LayerToc {
        let toc = Toc {
            version: 1,
            entries,
        };
        let footer = Footer::Estargz {
            toc_offset: 1 << 20,
        };
        layer_from_toc_json(serde_json::to_vec(&toc).unwrap(), footer, 2 << 20, None).unwrap()
    }

    fn process(json: &str) -> ProcessConfig {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn the_program_is_found_through_path_and_symlinks_across_layers() {
        let base = layer(vec![
            entry("usr/", "dir", ""),
            entry("usr/bin/", "dir", ""),
            entry("usr/bin/python3.11", "reg", ""),
            entry("bin", "symlink", "usr/bin"),
            entry("etc/", "dir", ""),
            entry("etc/passwd", "reg", ""),
            entry("etc/group", "reg", ""),
        ]);
        let top = layer(vec![
            entry("usr/bin/python3", "symlink", "python3.11"),
            entry("etc/group", "reg", ""),
        ]);
        let config =
            process(r#"{"Cmd":["python3","-c","print(1)"],"Env":["PATH=/usr/local/bin:/bin"]}"#);
        let files = startup_files(&config, &[Some(&top), Some(&base)]);
        assert_eq!(files[0], vec!["etc/group".to_string()]);
        assert_eq!(
            files[1],
            vec!["usr/bin/python3.11".to_string(), "etc/passwd".to_string()]
        );
    }

    #[test]
    fn whiteouts_hide_what_lies_below() {
        let base = layer(vec![
            entry("usr/bin/app", "reg", ""),
            entry("etc/passwd", "reg", ""),
            entry("opt/tool/run", "reg", ""),
            entry("opt/tool/run2", "hardlink", "opt/tool/run"),
        ]);
        let top = layer(vec![
            entry("usr/bin/.wh.app", "reg", ""),
            entry("etc/.wh..wh..opq", "reg", ""),
        ]);
        let stack = [Some(&top), Some(&base)];
        let files = startup_files(&process(r#"{"Entrypoint":["/usr/bin/app"]}"#), &stack);
        assert!(files.iter().all(Vec::is_empty), "{files:?}");
        let files = startup_files(&process(r#"{"Cmd":["/opt/tool/run2"]}"#), &stack);
        assert_eq!(files[1], vec!["opt/tool/run".to_string()]);
    }

    #[test]
    fn loops_and_missing_programs_give_nothing() {
        let only = layer(vec![
            entry("bin/a", "symlink", "b"),
            entry("bin/b", "symlink", "/bin/a"),
            entry("bin/dir", "dir", ""),
        ]);
        for cmd in [r#"["a"]"#, r#"["missing"]"#, r#"["dir"]"#, r#"[]"#] {
            let config = process(&format!(r#"{{"Cmd":{cmd},"Env":["PATH=/bin"]}}"#));
            assert!(
                startup_files(&config, &[Some(&only)])[0].is_empty(),
                "{cmd}"
            );
        }
        assert!(startup_files(&ProcessConfig::default(), &[None])[0].is_empty());
    }
}
