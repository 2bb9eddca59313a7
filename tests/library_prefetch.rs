//! Library prefetch through `lazysnap mount`, as root with a real registry and FUSE: reading the
//! start of a program fetches the libraries it names (its interpreter and needed libraries, found
//! in its own layer and in the layer below) and the libraries those name, before anything reads
//! them, and nothing else.

mod cli_common;
use cli_common::*;

use lazysnap_testbed::RegistryServer;

const LIB_DIR: &str = "usr/lib/x86_64-linux-gnu";

fn random(rng: &mut Rng, len: usize) -> Vec<u8> {
    (0..len).map(|_| rng.below(256) as u8).collect()
}

/// A 64-bit ELF program: header, three program headers (PT_INTERP, a read-only PT_LOAD holding
/// the interpreter path and a string table naming `needed`, an executable PT_LOAD), then `body`.
fn elf_program(interp: &str, needed: &[&str], body: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    out[..4].copy_from_slice(b"\x7fELF");
    out[4] = 2; // 64-bit
    out[5] = 1; // little-endian
    out[6] = 1;
    out[0x10] = 3; // ET_DYN
    out[0x12] = 0x3e; // x86-64
    out[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
    out[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
    out[0x38..0x3a].copy_from_slice(&3u16.to_le_bytes());
    let interp = format!("{interp}\0").into_bytes();
    let mut strings = vec![0u8];
    for name in needed.iter().chain(&["main", "GLIBC_2.34"]) {
        strings.extend_from_slice(name.as_bytes());
        strings.push(0);
    }
    let interp_at = 64 + 3 * 56;
    let text_at = interp_at + interp.len() + strings.len();
    let header = |kind: u32, flags: u32, offset: usize, len: usize| {
        let mut h = vec![0u8; 56];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        h[4..8].copy_from_slice(&flags.to_le_bytes());
        h[8..16].copy_from_slice(&(offset as u64).to_le_bytes());
        h[32..40].copy_from_slice(&(len as u64).to_le_bytes());
        h
    };
    out.extend(header(3, 4, interp_at, interp.len()));
    out.extend(header(1, 4, 0, text_at));
    out.extend(header(1, 5, text_at, body.len()));
    out.extend(interp);
    out.extend(strings);
    out.extend_from_slice(body);
    out
}

/// The bytes of the image the tests mount, by path.
struct Files {
    program: Vec<u8>,
    interp: Vec<u8>,
    needed: Vec<u8>,
    deep: Vec<u8>,
    own: Vec<u8>,
}

/// Pushes the two-layer image, converts it (with `convert_args`) and mounts it without background
/// fill; the registry, the mount and the files.
fn mount_image(
    work: &std::path::Path,
    convert_args: &[&str],
) -> (RegistryServer, MountedImage, Files) {
    let registry = RegistryServer::start().unwrap();
    let mut rng = Rng(0x5eed_11b5);
    // The base layer: the interpreter, the needed library (its soname is a symlink elsewhere;
    // here only the versioned file), the library that one needs, and a library nobody names.
    let interp = random(&mut rng, 150_000);
    let needed = elf_program("", &["libdeep.so.3"], &random(&mut rng, 300_000));
    let deep = random(&mut rng, 250_000);
    let unnamed = random(&mut rng, 300_000);
    let base = tar_of([
        (format!("{LIB_DIR}/ld-lazysnap-test.so.2"), interp.clone()),
        (format!("{LIB_DIR}/libunnamed.so.1"), unnamed),
        (format!("{LIB_DIR}/libneeded.so.1.2.3"), needed.clone()),
        (format!("{LIB_DIR}/libdeep.so.3"), deep.clone()),
    ]);
    // The program's layer: the program, a megabyte that keeps read-ahead of its first chunk
    // away from what follows, and a library of this layer the program names.
    let program = elf_program(
        "/lib64/ld-lazysnap-test.so.2",
        &["libneeded.so.1", "libown.so.7"],
        &random(&mut rng, 64 << 10),
    );
    let own = random(&mut rng, 200_000);
    let app = tar_of([
        ("app/bin/prog".to_string(), program.clone()),
        ("app/filler".to_string(), random(&mut rng, 1 << 20)),
        ("usr/lib/libown.so.7".to_string(), own.clone()),
    ]);
    let source = push_generated(&registry, work, &[base, app], "libs");
    let esgz = format!("{}/libs:esgz", registry.host());
    let mut args = vec!["convert"];
    args.extend_from_slice(convert_args);
    args.extend_from_slice(&[&source, &esgz]);
    lazysnap_ok(&args);
    let mounted = MountedImage::new(
        &esgz,
        work,
        "libs",
        &["--no-background", "--read-deadline", "3"],
    );
    let files = Files {
        program,
        interp,
        needed,
        deep,
        own,
    };
    (registry, mounted, files)
}

/// Reads what the loader reads first of a program, its header.
fn read_program_header(mounted: &MountedImage, files: &Files) {
    let mut head = [0u8; 4096];
    let mut file = std::fs::File::open(mounted.dir.join("app/bin/prog")).unwrap();
    std::io::Read::read(&mut file, &mut head).unwrap();
    assert_eq!(&head[..], &files.program[..4096]);
}

/// Waits until each layer has `expected` chunks cached (bottom first), or fails after 30 s.
fn wait_for_chunks(mounted: &MountedImage, expected: [u64; 2]) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let fetched: Vec<u64> = mounted.status_json()[0]["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|layer| layer["fetched_chunks"].as_u64().unwrap())
            .collect();
        if fetched == expected {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "chunks fetched per layer: {fetched:?}, expected {expected:?}\n{}",
            std::fs::read_to_string(mounted.cache_dir.join("mount-daemon.log")).unwrap_or_default()
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn assert_reads(mounted: &MountedImage, path: &str, data: &[u8]) {
    let read = std::fs::read(mounted.dir.join(path)).unwrap();
    assert!(read == data, "{path} read back wrong");
}

fn assert_not_fetched(mounted: &MountedImage, path: &str) {
    let err = std::fs::read(mounted.dir.join(path)).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{path}: {err}");
}

#[test]
fn reading_a_program_fetches_the_libraries_it_names_from_its_layer_and_the_one_below() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    let (mut registry, mounted, files) = mount_image(work.path(), &[]);
    read_program_header(&mounted, &files);
    // The program's chunk and its own library; the interpreter, the needed library and the one
    // that needs: 3 chunks below and 2 above (every file here fits one chunk), fetched without
    // being read.
    wait_for_chunks(&mounted, [3, 2]);

    // With the registry gone, the named libraries read right from the cache...
    registry.stop();
    assert_reads(
        &mounted,
        &format!("{LIB_DIR}/ld-lazysnap-test.so.2"),
        &files.interp,
    );
    assert_reads(
        &mounted,
        &format!("{LIB_DIR}/libneeded.so.1.2.3"),
        &files.needed,
    );
    assert_reads(&mounted, &format!("{LIB_DIR}/libdeep.so.3"), &files.deep);
    assert_reads(&mounted, "usr/lib/libown.so.7", &files.own);
    // ...and the library nobody named was not fetched.
    assert_not_fetched(&mounted, &format!("{LIB_DIR}/libunnamed.so.1"));
}

#[test]
fn a_layer_with_a_prefetch_plan_is_left_to_it() {
    require_root_and_fuse();
    let work = tempfile::tempdir().unwrap();
    // An optimized image records the parts of libraries startup reads: the base layer's plan
    // holds the interpreter only, so the needed library (which library prefetch would fetch
    // whole) stays unfetched; the program's layer has no plan and is served as before.
    let list = work.path().join("prefetch.list");
    std::fs::write(&list, format!("{LIB_DIR}/ld-lazysnap-test.so.2\n")).unwrap();
    let (mut registry, mounted, files) =
        mount_image(work.path(), &["--prefetch-list", list.to_str().unwrap()]);
    read_program_header(&mounted, &files);
    wait_for_chunks(&mounted, [1, 2]);
    // Nothing more comes: the needed library stays unfetched.
    std::thread::sleep(std::time::Duration::from_secs(1));
    wait_for_chunks(&mounted, [1, 2]);
    registry.stop();
    assert_reads(
        &mounted,
        &format!("{LIB_DIR}/ld-lazysnap-test.so.2"),
        &files.interp,
    );
    assert_reads(&mounted, "usr/lib/libown.so.7", &files.own);
    assert_not_fetched(&mounted, &format!("{LIB_DIR}/libneeded.so.1.2.3"));
    assert_not_fetched(&mounted, &format!("{LIB_DIR}/libunnamed.so.1"));
}
