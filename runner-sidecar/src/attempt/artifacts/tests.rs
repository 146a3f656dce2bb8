use std::collections::BTreeMap;

use super::*;

/// A scratch area: `workspace/` for the step, `outside/` holding a sentinel that nothing
/// may touch, and the archive beside them.
struct Scratch {
    _dir: tempdir::Dir,
    workspace: PathBuf,
    outside: PathBuf,
    archive: PathBuf,
}

mod tempdir {
    /// A temporary directory removed on drop.
    pub struct Dir(pub std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl Scratch {
    fn new() -> Scratch {
        let root = std::env::temp_dir().join(format!(
            "sluice-artifacts-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let workspace = root.join("workspace");
        let outside = root.join("outside");
        std::fs::create_dir_all(&workspace).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("sentinel"), b"untouched").unwrap();
        Scratch {
            archive: root.join("archive.tar"),
            workspace,
            outside,
            _dir: tempdir::Dir(root),
        }
    }

    fn write(&self, rel: &str, bytes: &[u8]) {
        let path = self.workspace.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    /// Every file and directory beneath `dir`, with the contents of files.
    fn tree(dir: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
        let mut found = BTreeMap::new();
        let mut stack = vec![dir.to_path_buf()];
        while let Some(at) = stack.pop() {
            for entry in std::fs::read_dir(&at).unwrap() {
                let path = entry.unwrap().path();
                let rel = path.strip_prefix(dir).unwrap().display().to_string();
                let meta = std::fs::symlink_metadata(&path).unwrap();
                if meta.is_dir() {
                    found.insert(rel, None);
                    stack.push(path);
                } else {
                    found.insert(rel, Some(std::fs::read(&path).unwrap_or_default()));
                }
            }
        }
        found
    }

    /// The area outside the workspace is as it was made.
    fn assert_outside_untouched(&self) {
        let root = self.workspace.parent().unwrap();
        let mut names: Vec<String> = std::fs::read_dir(root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["archive.tar", "outside", "workspace"]);
        assert_eq!(
            Scratch::tree(&self.outside),
            BTreeMap::from([("sentinel".to_string(), Some(b"untouched".to_vec()))])
        );
    }
}

#[test]
fn matched_files_and_directories_are_packed_and_come_back_the_same() {
    let from = Scratch::new();
    from.write("dist/app.js", b"console.log(1)");
    from.write("dist/deep/er/x.bin", &[0u8, 1, 2, 255]);
    from.write("report.json", b"{\"ok\":true}");
    from.write("notes/report.json", b"not at the root");
    from.write("scratch.txt", b"left behind");
    from.write(policy::CONTEXT_FILE, b"{}");
    std::os::unix::fs::symlink("/etc/passwd", from.workspace.join("dist/passwd")).unwrap();
    std::fs::hard_link(
        from.workspace.join("scratch.txt"),
        from.workspace.join("dist/hard"),
    )
    .unwrap();
    nix::unistd::mkfifo(&from.workspace.join("dist/fifo"), Mode::S_IRWXU).unwrap();
    std::fs::create_dir_all(from.workspace.join("dist/empty")).unwrap();

    let patterns = ["dist/**".to_string(), "report.json".into(), "dist".into()];
    let packed = pack(&from.workspace, &patterns, &from.archive, 1 << 20, None).unwrap();
    assert_eq!(
        packed.bytes,
        std::fs::metadata(&from.archive).unwrap().len()
    );
    let mut skipped = packed.skipped.clone();
    skipped.sort();
    assert_eq!(
        skipped,
        [
            "dist/fifo (not a regular file)",
            "dist/hard (a file with several links)",
            "dist/passwd (a link)"
        ]
    );

    let to = Scratch::new();
    let (entries, bytes) = unpack(&to.workspace, &from.archive, 1 << 20, None).unwrap();
    assert_eq!(entries, packed.entries);
    assert_eq!(bytes, 14 + 4 + 11);
    let tree = Scratch::tree(&to.workspace);
    let expected: BTreeMap<String, Option<Vec<u8>>> = [
        ("dist", None),
        ("dist/app.js", Some(b"console.log(1)".to_vec())),
        ("dist/deep", None),
        ("dist/deep/er", None),
        ("dist/deep/er/x.bin", Some(vec![0u8, 1, 2, 255])),
        ("dist/empty", None),
        ("report.json", Some(b"{\"ok\":true}".to_vec())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    assert_eq!(tree, expected);
    let digest = hex(&Sha256::digest(std::fs::read(&from.archive).unwrap()));
    assert_eq!(packed.sha256, digest);
}

#[test]
fn a_huge_sparse_file_fails_the_step_without_being_read() {
    let scratch = Scratch::new();
    let file = File::create(scratch.workspace.join("big")).unwrap();
    file.set_len(10 << 30).unwrap();
    let started = std::time::Instant::now();
    let err = pack(
        &scratch.workspace,
        &["big".into()],
        &scratch.archive,
        64 << 20,
        None,
    )
    .unwrap_err();
    assert!(
        matches!(&err, PackError::TooLarge(m) if m.contains("SLUICE_ARTIFACT_MAX_BYTES")),
        "{err:?}"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    assert!(std::fs::metadata(&scratch.archive).unwrap().len() < 1 << 20);
}

#[test]
fn a_workspace_over_the_cap_fails_the_step() {
    let scratch = Scratch::new();
    for i in 0..40 {
        scratch.write(&format!("out/{i}"), &[7u8; 4096]);
    }
    let err = pack(
        &scratch.workspace,
        &["out".into()],
        &scratch.archive,
        64 << 10,
        None,
    )
    .unwrap_err();
    assert!(matches!(err, PackError::TooLarge(_)), "{err:?}");
}

/// A tar header block with any name and type, as a hostile uploader would write it.
fn raw_header(name: &[u8], kind: tar::EntryType, size: u64, link: &[u8]) -> [u8; 512] {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    let bytes = header.as_mut_bytes();
    bytes[..name.len()].copy_from_slice(name);
    bytes[157..157 + link.len()].copy_from_slice(link);
    header.set_cksum();
    *header.as_bytes()
}

/// A GNU sparse entry whose holes make it `real_size` bytes once unpacked.
fn sparse_header(name: &[u8], real_size: u64) -> [u8; 512] {
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(tar::EntryType::GNUSparse);
    // One byte of data at the very end; the rest is a hole.
    header.set_size(1);
    header.set_mode(0o644);
    let gnu = header.as_gnu_mut().unwrap();
    gnu.set_real_size(real_size);
    gnu.sparse[0].set_offset(real_size - 1);
    gnu.sparse[0].numbytes = *b"00000000001\0";
    header.as_mut_bytes()[..name.len()].copy_from_slice(name);
    header.set_cksum();
    *header.as_bytes()
}

/// A raw entry: its header block and data.
type Entry = ([u8; 512], Vec<u8>);

/// Writes an archive of `(header, data)` entries, data padded to 512, and the end marker.
fn hostile_archive(path: &Path, entries: &[Entry]) {
    let mut out = std::io::BufWriter::new(File::create(path).unwrap());
    for (header, data) in entries {
        out.write_all(header).unwrap();
        out.write_all(data).unwrap();
        let pad = (512 - data.len() % 512) % 512;
        out.write_all(&vec![0u8; pad]).unwrap();
    }
    out.write_all(&[0u8; 1024]).unwrap();
    out.flush().unwrap();
}

#[test]
fn hostile_archives_are_refused_with_nothing_written_outside_the_workspace() {
    use tar::EntryType::*;
    let file = |name: &str, data: &[u8]| {
        (
            raw_header(name.as_bytes(), Regular, data.len() as u64, b""),
            data.to_vec(),
        )
    };
    let cases: Vec<(&str, Vec<Entry>, &str)> = vec![
        (
            "traversal",
            vec![file("../outside/sentinel", b"owned")],
            "'..'",
        ),
        (
            "deep traversal",
            vec![file("a/../../outside/x", b"owned")],
            "'..'",
        ),
        (
            "absolute",
            vec![file("/tmp/sluice-owned", b"owned")],
            "absolute",
        ),
        (
            "symlink then write through it",
            vec![
                (raw_header(b"link", Symlink, 0, b"../outside"), vec![]),
                file("link/sentinel", b"owned"),
            ],
            "Symlink",
        ),
        (
            "hard link",
            vec![(raw_header(b"hard", Link, 0, b"../outside/sentinel"), vec![])],
            "Link",
        ),
        (
            "device",
            vec![(raw_header(b"dev", Char, 0, b""), vec![])],
            "Char",
        ),
        (
            "ten gigabyte sparse",
            vec![(sparse_header(b"sparse", 10 << 30), vec![1u8])],
            "GNUSparse",
        ),
        (
            "ten gigabytes claimed",
            vec![(raw_header(b"big", Regular, 10 << 30, b""), vec![0u8; 512])],
            "over what is left of the cap",
        ),
        (
            "the context file",
            vec![file(policy::CONTEXT_FILE, b"{\"forged\":1}")],
            "context or output",
        ),
    ];
    for (what, entries, expected) in cases {
        let scratch = Scratch::new();
        hostile_archive(&scratch.archive, &entries);
        let err = unpack(&scratch.workspace, &scratch.archive, 64 << 20, None).expect_err(what);
        assert!(
            matches!(&err, UnpackError::Refused(m) if m.contains(expected)),
            "{what}: {err:?}"
        );
        scratch.assert_outside_untouched();
        assert!(!Path::new("/tmp/sluice-owned").exists(), "{what}");
        for (rel, _) in Scratch::tree(&scratch.workspace) {
            let meta = std::fs::symlink_metadata(scratch.workspace.join(&rel)).unwrap();
            assert!(meta.is_dir() || meta.is_file(), "{what}: {rel} is neither");
        }
    }
}

#[test]
fn an_archive_of_a_hundred_thousand_entries_is_refused_at_the_cap() {
    let scratch = Scratch::new();
    let mut out = std::io::BufWriter::new(File::create(&scratch.archive).unwrap());
    for i in 0..100_000 {
        let header = raw_header(format!("f{i}").as_bytes(), tar::EntryType::Regular, 0, b"");
        out.write_all(&header).unwrap();
    }
    out.write_all(&[0u8; 1024]).unwrap();
    out.flush().unwrap();
    drop(out);
    let err = unpack(&scratch.workspace, &scratch.archive, 64 << 20, None).unwrap_err();
    assert_eq!(
        err,
        UnpackError::Refused(format!("more than {MAX_ENTRIES} entries"))
    );
    scratch.assert_outside_untouched();
    let written = std::fs::read_dir(&scratch.workspace).unwrap().count() as u64;
    assert_eq!(written, MAX_ENTRIES);
}

#[test]
fn links_planted_in_the_workspace_are_never_written_through() {
    // What a process of the slot's user left behind could plant before the unpack: a link
    // where a directory of the archive goes, and a hard link to a file outside.
    let scratch = Scratch::new();
    std::os::unix::fs::symlink(&scratch.outside, scratch.workspace.join("d")).unwrap();
    std::fs::hard_link(
        scratch.outside.join("sentinel"),
        scratch.workspace.join("h"),
    )
    .unwrap();
    for (name, expected) in [("d/sentinel", "not a directory"), ("h", "several links")] {
        hostile_archive(
            &scratch.archive,
            &[(
                raw_header(name.as_bytes(), tar::EntryType::Regular, 5, b""),
                b"owned".to_vec(),
            )],
        );
        let err = unpack(&scratch.workspace, &scratch.archive, 64 << 20, None).unwrap_err();
        assert!(
            matches!(&err, UnpackError::Refused(m) if m.contains(expected)),
            "{name}: {err:?}"
        );
        assert_eq!(
            std::fs::read(scratch.outside.join("sentinel")).unwrap(),
            b"untouched",
            "{name}"
        );
    }
}

#[test]
fn files_of_another_owner_are_skipped() {
    let scratch = Scratch::new();
    scratch.write("out/mine.txt", b"x");
    let owner = nix::unistd::Uid::effective().as_raw();
    let packed = pack(
        &scratch.workspace,
        &["out".into()],
        &scratch.archive,
        1 << 20,
        Some(owner + 1),
    )
    .unwrap();
    assert_eq!(packed.skipped, ["out/mine.txt (not the tool's own file)"]);
    let packed = pack(
        &scratch.workspace,
        &["out".into()],
        &scratch.archive,
        1 << 20,
        Some(owner),
    )
    .unwrap();
    assert!(packed.skipped.is_empty());
}

#[test]
fn the_walk_goes_only_where_a_glob_reaches() {
    let reaches = |pattern: &str, dir: &str| Pattern::new(pattern).unwrap().reaches(dir);
    assert!(reaches("dist/**", "dist"));
    assert!(reaches("dist/**", "dist/a"));
    assert!(!reaches("dist/**", "node_modules"));
    assert!(reaches("a/*/c.txt", "a/b"));
    assert!(!reaches("a/*/c.txt", "a/b/c"));
    assert!(!reaches("a/b.txt", "a/b"));
    assert!(reaches("**/x.json", "anything/deep"));
    assert!(reaches("{a,b}/x", "c"), "braces: looked through");
    assert!(
        !reaches("report.json", "reports"),
        "a name at the root only"
    );
}
