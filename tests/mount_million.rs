//! A layer of a million entries (1,000 directories of 1,000 files, 7 MB compressed), converted
//! by `lazysnap convert` and mounted lazily (real registry, real FUSE): every entry is listed,
//! files read right, and the mount daemon's memory stays bounded. Prints the figures. The limit
//! beyond which a TOC is refused (`MAX_TOC_ENTRIES`) is checked in tests/estargz_bad_input.rs.

mod cli_common;
use cli_common::*;

use lazysnap_testbed::RegistryServer;

const DIRS: usize = 1000;
const FILES_PER_DIR: usize = 1000;

/// A tar of `DIRS` directories of `FILES_PER_DIR` files; file `d/f` holds its own name.
fn million_tar() -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::with_capacity((DIRS * FILES_PER_DIR + DIRS) * 1024));
    for d in 0..DIRS {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_size(0);
        header.set_mode(0o755);
        tar.append_data(&mut header, format!("m/{d:04}/"), std::io::empty())
            .unwrap();
        for f in 0..FILES_PER_DIR {
            let data = if f == 0 {
                format!("m/{d:04}/{f:04}\n").into_bytes()
            } else {
                Vec::new()
            };
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            tar.append_data(&mut header, format!("m/{d:04}/{f:04}"), data.as_slice())
                .unwrap();
        }
    }
    tar.into_inner().unwrap()
}

fn count_entries(dir: &std::path::Path) -> usize {
    let mut count = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let entry = entry.unwrap();
            count += 1;
            if entry.file_type().unwrap().is_dir() {
                stack.push(entry.path());
            }
        }
    }
    count
}

#[test]
fn a_million_entry_layer_mounts_lists_and_reads_with_bounded_memory() {
    require_root_and_fuse();
    let registry = RegistryServer::start().unwrap();
    let work = tempfile::tempdir().unwrap();
    let source = push_generated(&registry, work.path(), &[million_tar()], "million");
    let esgz = format!("{}/million:esgz", registry.host());
    lazysnap_ok(&["convert", &source, &esgz]);

    let mounted = MountedImage::new(&esgz, work.path(), "mnt", &["--no-background"]);
    let listed = count_entries(&mounted.dir);
    assert_eq!(listed, 1 + DIRS + DIRS * FILES_PER_DIR, "entries listed");
    for d in [0, 499, 999] {
        let name = format!("m/{d:04}/0000");
        let text = std::fs::read_to_string(mounted.dir.join(&name)).unwrap();
        assert_eq!(text, format!("{name}\n"));
        let meta = std::fs::metadata(mounted.dir.join(format!("m/{d:04}/0999"))).unwrap();
        assert_eq!(meta.len(), 0);
    }
    let Resources {
        peak_rss,
        rss: now,
        fds,
    } = mounted.daemon_resources();
    eprintln!(
        "million entries: {listed} listed; mount daemon peak RSS {:.0} MiB while reading the TOC, \
         {:.0} MiB mounted, {fds} open fds",
        peak_rss as f64 / (1 << 20) as f64,
        now as f64 / (1 << 20) as f64
    );
    // The TOC costs memory per entry while it is read (about 0.8 KiB); what stays, the index
    // reads use, is a fraction of that. MAX_TOC_ENTRIES bounds both.
    assert!(peak_rss < 1536 << 20, "peak RSS {peak_rss}");
    assert!(now < 384 << 20, "RSS once mounted {now}");
}
