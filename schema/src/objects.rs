//! The object store every part of ablate shares (checkpoints, the programs'
//! packed code, trials' logs): how a URL opens it, and where things live in it.

use std::sync::Arc;

use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

/// Opens the store named by `url`: `file:///abs/dir`, a plain directory path, or `s3://bucket/prefix`.
/// S3 settings come from the usual `AWS_*` variables (`AWS_ENDPOINT`, `AWS_ALLOW_HTTP`, ...).
pub fn open(url: &str) -> Result<(Arc<dyn ObjectStore>, Path), String> {
    let local_dir = match Url::parse(url) {
        Ok(u) if u.scheme() == "file" => Some(std::path::PathBuf::from(u.path())),
        Ok(u) if u.scheme().len() > 1 => None,
        // A plain path (or a Windows-style drive letter, which we treat as a path).
        _ => Some(std::path::absolute(url).map_err(|e| format!("object store directory {url}: {e}"))?),
    };
    if let Some(dir) = local_dir {
        std::fs::create_dir_all(&dir).map_err(|e| format!("object store directory {}: {e}", dir.display()))?;
        let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)
            .map_err(|e| format!("object store directory {}: {e}", dir.display()))?;
        return Ok((Arc::new(store), Path::default()));
    }
    let parsed = Url::parse(url).map_err(|e| format!("object store `{url}`: {e}"))?;
    let options = std::env::vars()
        .filter(|(k, _)| k.starts_with("AWS_"))
        .map(|(k, v)| (k.to_ascii_lowercase(), v));
    let (store, prefix) =
        object_store::parse_url_opts(&parsed, options).map_err(|e| format!("object store `{url}`: {e}"))?;
    Ok((Arc::from(store), prefix))
}

/// `<prefix>/<parts...>`.
pub fn under(prefix: &Path, parts: &[&str]) -> Path {
    let mut all: Vec<String> = prefix.parts().map(|p| p.as_ref().to_string()).collect();
    all.extend(parts.iter().flat_map(|p| p.split('/')).map(String::from));
    Path::from_iter(all)
}

/// Where a program's packed code lives: by its content's hash, shared by every
/// experiment that runs the same code.
pub fn code_path(prefix: &Path, hash: &str) -> Path {
    under(prefix, &["code", &format!("{hash}.tar.gz")])
}

/// Where one attempt of a trial keeps its log (its process's stdout and stderr, bounded).
pub fn log_path(prefix: &Path, experiment: &str, trial: &str, attempt: u32) -> Path {
    under(
        prefix,
        &[
            "experiments",
            experiment,
            "trials",
            trial,
            "logs",
            &format!("attempt-{attempt}.log"),
        ],
    )
}

/// A checkpoint's sidecar (`step-N.json`, its step, cursor and hashes) beside its
/// tensors (`step-N.safetensors`).
pub fn sidecar_of(tensors: &str) -> String {
    tensors.replace(".safetensors", ".json")
}

/// The tensors of a checkpoint, from either of its two objects.
pub fn tensors_of(object: &str) -> String {
    object.replace(".json", ".safetensors")
}
