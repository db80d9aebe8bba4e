//! A command trial's code as it travels: `ablate submit` packs the spec's `code`
//! directory (what its `.gitignore` and `.ablateignore` files leave in) into one
//! gzipped tar, the same bytes for the same files whatever their times or owners;
//! the SHA-256 of the tar names it in the object store and in each attempt's
//! provenance; workers unpack it once into a cache and check the hash.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

/// The most bytes the packed files may hold together (before compression).
pub const MAX_CODE_BYTES: u64 = 32 << 20;
/// The most files packed code may hold.
pub const MAX_CODE_FILES: usize = 20_000;

/// A directory packed for the object store.
pub struct Packed {
    /// The gzipped tar.
    pub archive: Vec<u8>,
    /// Hex SHA-256 of the tar (before compression): the code's identity.
    pub hash: String,
    pub files: usize,
    /// The files' bytes together.
    pub bytes: u64,
}

/// Packs the files under `dir` (what `.gitignore` and `.ablateignore` leave in, no
/// `.git`), in path order, with fixed times, owners and modes (0755 for files any
/// user may execute, 0644 otherwise). The error says what to change.
pub fn pack(dir: &Path) -> Result<Packed, String> {
    pack_except(dir, None)
}

/// The same, leaving out the file `except` (the spec being submitted, when it lies in
/// its own code folder: a spec given more sweep points runs the same code).
pub fn pack_except(dir: &Path, except: Option<&Path>) -> Result<Packed, String> {
    let except = except.and_then(|p| std::fs::canonicalize(p).ok());
    let meta = std::fs::metadata(dir).map_err(|e| format!("the code directory {}: {e}", dir.display()))?;
    if !meta.is_dir() {
        return Err(format!("the code directory {} is not a directory", dir.display()));
    }
    let mut files: Vec<(PathBuf, PathBuf)> = Vec::new();
    let walk = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_global(false)
        .git_exclude(false)
        .require_git(false)
        .parents(false)
        .follow_links(true)
        .add_custom_ignore_filename(".ablateignore")
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    let mut bytes = 0u64;
    for entry in walk {
        let entry = entry.map_err(|e| format!("reading the code directory {}: {e}", dir.display()))?;
        let path = entry.path();
        // Links are packed as what they point at (the walk follows them into folders).
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if !meta.is_file()
            || except
                .as_deref()
                .is_some_and(|x| std::fs::canonicalize(path).is_ok_and(|p| p == x))
        {
            continue;
        }
        bytes += meta.len();
        if bytes > MAX_CODE_BYTES {
            return Err(format!(
                "the code directory {} holds over {} MiB (the limit of packed code); keep data sets and \
                 outputs out of it (list them in .gitignore or .ablateignore) or read them from the data roots",
                dir.display(),
                MAX_CODE_BYTES >> 20
            ));
        }
        let relative = path.strip_prefix(dir).expect("walked under dir").to_path_buf();
        files.push((relative, path.to_path_buf()));
        if files.len() > MAX_CODE_FILES {
            return Err(format!(
                "the code directory {} holds over {MAX_CODE_FILES} files; list what the program does not \
                 need in .gitignore or .ablateignore",
                dir.display()
            ));
        }
    }
    files.sort();
    let mut tar = tar::Builder::new(Vec::new());
    for (relative, path) in &files {
        let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let executable = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(path)
                .map_err(|e| format!("{}: {e}", path.display()))?
                .permissions(),
        ) & 0o111
            != 0;
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(if executable { 0o755 } else { 0o644 });
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        header.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut header, relative, data.as_slice())
            .map_err(|e| format!("packing {}: {e}", relative.display()))?;
    }
    let tar = tar.into_inner().map_err(|e| format!("packing the code: {e}"))?;
    let hash = hex(&Sha256::digest(&tar));
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    std::io::Write::write_all(&mut gz, &tar).map_err(|e| e.to_string())?;
    let archive = gz.finish().map_err(|e| e.to_string())?;
    Ok(Packed {
        archive,
        hash,
        files: files.len(),
        bytes,
    })
}

/// The tar inside `archive`, checked against `hash` (and the size limit).
pub fn open(archive: &[u8], hash: &str) -> Result<Vec<u8>, String> {
    let mut tar = Vec::new();
    flate2::read::GzDecoder::new(archive)
        .take(MAX_CODE_BYTES * 2 + (1 << 20))
        .read_to_end(&mut tar)
        .map_err(|e| format!("the packed code is not a gzipped tar: {e}"))?;
    let actual = hex(&Sha256::digest(&tar));
    if actual != hash {
        return Err(format!(
            "the packed code's hash is {actual}, not {hash}: it was changed or cut short"
        ));
    }
    Ok(tar)
}

/// Unpacks `archive` (checked against `hash`) as directory `into`, which must not
/// exist yet: into a sibling first, then renamed, so a reader never sees half of
/// it. Another unpacker that got there first wins; its files are the same.
pub fn unpack(archive: &[u8], hash: &str, into: &Path) -> Result<(), String> {
    let tar = open(archive, hash)?;
    let parent = into.parent().ok_or("the code cache has no parent directory")?;
    std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    let staging = parent.join(format!(".unpacking-{hash}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&staging);
    tar::Archive::new(tar.as_slice())
        .unpack(&staging)
        .map_err(|e| format!("unpacking the code into {}: {e}", staging.display()))?;
    if let Err(e) = std::fs::rename(&staging, into) {
        let _ = std::fs::remove_dir_all(&staging);
        if !into.is_dir() {
            return Err(format!("{}: {e}", into.display()));
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(files: &[(&str, &str)]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ablate-code-{}", uuid::Uuid::new_v4()));
        for (name, text) in files {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        dir
    }

    #[test]
    fn packing_keeps_what_gitignore_leaves_and_names_it_by_content() {
        let a = tree(&[
            ("train.py", "print(1)"),
            ("lib/model.py", "W = 2"),
            (".gitignore", "data/\n*.pt\n"),
            (".ablateignore", "notes.txt\n"),
            ("data/big.bin", "xxxx"),
            ("ckpt.pt", "weights"),
            ("notes.txt", "todo"),
            (".git/HEAD", "ref"),
        ]);
        let packed = pack(&a).unwrap();
        assert_eq!(packed.files, 4, "train.py, lib/model.py, .gitignore, .ablateignore");
        // The same files elsewhere, written later, pack to the same bytes.
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = tree(&[
            (".ablateignore", "notes.txt\n"),
            (".gitignore", "data/\n*.pt\n"),
            ("lib/model.py", "W = 2"),
            ("train.py", "print(1)"),
        ]);
        assert_eq!(pack(&b).unwrap().hash, packed.hash);
        std::fs::write(b.join("train.py"), "print(2)").unwrap();
        assert_ne!(pack(&b).unwrap().hash, packed.hash);

        let into = a.join("unpacked/here");
        unpack(&packed.archive, &packed.hash, &into).unwrap();
        assert_eq!(std::fs::read_to_string(into.join("lib/model.py")).unwrap(), "W = 2");
        assert!(!into.join("data").exists() && !into.join("notes.txt").exists());
        // A changed archive is refused.
        let err = unpack(&packed.archive, &"0".repeat(64), &a.join("other")).unwrap_err();
        assert!(err.contains("changed or cut short"), "{err}");
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn code_over_the_limit_is_refused_with_what_to_do() {
        let dir = tree(&[("train.py", "x")]);
        let big = std::fs::File::create(dir.join("data.bin")).unwrap();
        big.set_len(MAX_CODE_BYTES + 1).unwrap();
        let err = pack(&dir).err().unwrap();
        assert!(err.contains(".gitignore or .ablateignore"), "{err}");
        std::fs::write(dir.join(".ablateignore"), "data.bin\n").unwrap();
        assert_eq!(pack(&dir).unwrap().files, 2);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
