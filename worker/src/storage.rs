//! Object storage for checkpoints: a local directory by default, S3 in a cluster.
//!
//! A checkpoint is `experiments/<experiment>/trials/<trial>/step-<step>.safetensors`
//! (model and optimizer tensors, readable with `safetensors.torch.load_file`)
//! plus a `.json` sidecar beside it (step, data cursor, seed, spec hash).

use std::collections::HashMap;
use std::sync::Arc;

use ablate_experiments::trial::{CheckpointStore, Listing, LocatedFile, Snapshot, TrialError};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde_json::Value;
use tch::Tensor;

/// Opens the store named by `url` (`ablate_schema::objects::open`).
pub fn open(url: &str) -> anyhow::Result<(Arc<dyn ObjectStore>, Path)> {
    ablate_schema::objects::open(url).map_err(anyhow::Error::msg)
}

/// Writes, reads back and deletes a probe object: a worker that can't do this
/// would fail every trial it took, so it refuses to start instead.
pub async fn probe(url: &str, worker: &str) -> anyhow::Result<()> {
    let (store, prefix) = open(url)?;
    let mut parts: Vec<String> = prefix.parts().map(|p| p.as_ref().to_string()).collect();
    parts.extend([".ablate-probe".to_string(), worker.to_string()]);
    let path = Path::from_iter(parts);
    let body = format!("worker {worker} checks that it can write here");
    let fail = |what: &str, e: object_store::Error| anyhow::anyhow!("cannot {what} {path}: {e}");
    store
        .put(&path, body.clone().into_bytes().into())
        .await
        .map_err(|e| fail("write", e))?;
    let read = store.get(&path).await.map_err(|e| fail("read", e))?.bytes().await;
    let read = read.map_err(|e| fail("read", e))?;
    if read.as_ref() != body.as_bytes() {
        anyhow::bail!("{path} read back other bytes than were written");
    }
    store.delete(&path).await.map_err(|e| fail("delete", e))?;
    Ok(())
}

/// `<prefix>/experiments/<experiment>/<name>`: where an experiment's objects live.
pub fn experiment_path(prefix: &Path, experiment: &str, name: &str) -> Path {
    let mut parts: Vec<String> = prefix.parts().map(|p| p.as_ref().to_string()).collect();
    parts.extend(["experiments".to_string(), experiment.to_string()]);
    parts.extend(name.split('/').map(String::from));
    Path::from_iter(parts)
}

pub fn checkpoint_path(prefix: &Path, experiment: &str, trial: &str, step: u64) -> Path {
    experiment_path(prefix, experiment, &format!("trials/{trial}/step-{step}.safetensors"))
}

fn sidecar_path(tensors: &Path) -> Path {
    Path::from(ablate_schema::objects::sidecar_of(tensors.as_ref()))
}

/// A checkpoint that was made durable; the daemon records it with the coordinator.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Written {
    pub step: u64,
    pub path: String,
    pub bytes: u64,
}

/// The trial process's checkpoint store over object storage.
pub struct ObjectCheckpoints {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub experiment: String,
    pub trial: String,
    pub spec_hash: String,
    pub resume_from: Option<String>,
    pub runtime: tokio::runtime::Runtime,
    pub scratch: std::path::PathBuf,
    /// Called once a checkpoint is durable.
    pub on_written: Box<dyn FnMut(Written)>,
}

/// Further tries of a checkpoint write that failed (pauses 0.5 s doubling: about 15 s in all).
const CHECKPOINT_RETRIES: u32 = 5;

fn ckpt_err(e: impl std::fmt::Display) -> TrialError {
    TrialError::Checkpoint(e.to_string())
}

impl CheckpointStore for ObjectCheckpoints {
    fn save(&mut self, step: u64, tensors: &[(String, Tensor)], sidecar: &Value) -> Result<(), TrialError> {
        let span = tracing::info_span!("checkpoint write", step, bytes = tracing::field::Empty).entered();
        let file = self.scratch.join(format!("{}-{step}.safetensors", self.trial));
        Tensor::write_safetensors(tensors, &file)?;
        let bytes = std::fs::read(&file).map_err(ckpt_err)?;
        let _ = std::fs::remove_file(&file);
        let size = bytes.len() as u64;
        span.record("bytes", size);
        let path = checkpoint_path(&self.prefix, &self.experiment, &self.trial, step);
        let mut sidecar = sidecar.clone();
        sidecar["spec_hash"] = Value::from(self.spec_hash.clone());
        sidecar["tensors"] = Value::from(path.to_string());
        let sidecar_bytes = bytes::Bytes::from(serde_json::to_vec_pretty(&sidecar).map_err(ckpt_err)?);
        let bytes = bytes::Bytes::from(bytes);
        // An object store that is briefly away (a restart, a network blip) costs
        // a wait, not the trial: each write is tried again with a growing pause.
        let mut pause = std::time::Duration::from_millis(500);
        let mut tries = 0;
        loop {
            let written = self.runtime.block_on(async {
                self.store.put(&path, bytes.clone().into()).await?;
                self.store.put(&sidecar_path(&path), sidecar_bytes.clone().into()).await
            });
            match written {
                Ok(_) => break,
                Err(e) if tries < CHECKPOINT_RETRIES => {
                    eprintln!("checkpoint at step {step}: {e}; trying again in {pause:?}");
                    std::thread::sleep(pause);
                    pause *= 2;
                    tries += 1;
                }
                Err(e) => return Err(ckpt_err(e)),
            }
        }
        (self.on_written)(Written {
            step,
            path: path.to_string(),
            bytes: size,
        });
        Ok(())
    }

    fn latest(&mut self) -> Result<Option<Snapshot>, TrialError> {
        let Some(path) = self.resume_from.clone() else {
            return Ok(None);
        };
        let path = Path::from(path);
        let _span = tracing::info_span!("checkpoint read", path = %path).entered();
        let (tensor_bytes, sidecar_bytes) = self.runtime.block_on(async {
            let t = self
                .store
                .get(&path)
                .await
                .map_err(ckpt_err)?
                .bytes()
                .await
                .map_err(ckpt_err)?;
            let s = self
                .store
                .get(&sidecar_path(&path))
                .await
                .map_err(ckpt_err)?
                .bytes()
                .await
                .map_err(ckpt_err)?;
            Ok::<_, TrialError>((t, s))
        })?;
        let file = self.scratch.join(format!("{}-resume.safetensors", self.trial));
        std::fs::write(&file, &tensor_bytes).map_err(ckpt_err)?;
        let tensors = Tensor::read_safetensors(&file)?;
        let _ = std::fs::remove_file(&file);
        let sidecar: Value = serde_json::from_slice(&sidecar_bytes).map_err(ckpt_err)?;
        let step = sidecar["step"].as_u64().ok_or_else(|| ckpt_err("sidecar lacks step"))?;
        Ok(Some(Snapshot {
            step,
            tensors: tensors.into_iter().collect::<HashMap<_, _>>(),
            sidecar,
        }))
    }
}

/// The trial process's data store: locations anywhere (S3 or this host's files), and the
/// experiment's own objects under `<prefix>/experiments/<experiment>/` in the worker's store.
pub struct ObjectData {
    pub store: Arc<dyn ObjectStore>,
    pub prefix: Path,
    pub experiment: String,
    pub runtime: tokio::runtime::Runtime,
}

fn data_err(e: impl std::fmt::Display) -> TrialError {
    TrialError::Data(e.to_string())
}

impl ObjectData {
    fn own(&self, name: &str) -> Path {
        experiment_path(&self.prefix, &self.experiment, name)
    }
}

impl ablate_experiments::trial::DataStore for ObjectData {
    fn read_location(
        &mut self,
        location: &str,
        suffix: &str,
        pick: &dyn Fn(usize) -> bool,
    ) -> Result<Listing, TrialError> {
        if !location.starts_with("s3://") {
            return ablate_experiments::trial::read_local_location(location, suffix, pick);
        }
        let (store, prefix) = open(location).map_err(data_err)?;
        self.runtime.block_on(async {
            use futures::TryStreamExt;
            let mut listed: Vec<object_store::ObjectMeta> = store
                .list(Some(&prefix))
                .try_collect()
                .await
                .map_err(|e| data_err(format!("{location}: {e}")))?;
            if listed.is_empty() {
                // A single object rather than a prefix.
                listed.push(
                    store
                        .head(&prefix)
                        .await
                        .map_err(|e| data_err(format!("{location}: {e}")))?,
                );
            }
            listed.retain(|m| m.location.as_ref().ends_with(suffix));
            listed.sort_by(|a, b| a.location.cmp(&b.location));
            let mut files = Vec::new();
            for (index, meta) in listed.iter().enumerate().filter(|(i, _)| pick(*i)) {
                let bytes = store
                    .get(&meta.location)
                    .await
                    .map_err(data_err)?
                    .bytes()
                    .await
                    .map_err(data_err)?;
                files.push(LocatedFile {
                    index,
                    name: meta.location.to_string(),
                    bytes: bytes.to_vec(),
                });
            }
            Ok(Listing {
                total: listed.len(),
                files,
            })
        })
    }

    fn put(&mut self, name: &str, bytes: Vec<u8>) -> Result<String, TrialError> {
        let path = self.own(name);
        self.runtime
            .block_on(self.store.put(&path, bytes.into()))
            .map_err(data_err)?;
        Ok(path.to_string())
    }

    fn get(&mut self, name: &str) -> Result<Option<Vec<u8>>, TrialError> {
        let path = self.own(name);
        self.runtime.block_on(async {
            match self.store.get(&path).await {
                Ok(r) => Ok(Some(r.bytes().await.map_err(data_err)?.to_vec())),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(data_err(e)),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use ablate_experiments::trial::CheckpointStore;
    use serde_json::json;

    use super::*;

    #[test]
    fn checkpoints_round_trip_through_a_local_object_store() {
        let dir = std::env::temp_dir().join(format!("ablate-storage-{}", uuid::Uuid::new_v4().simple()));
        let (store, prefix) = open(&dir.to_string_lossy()).unwrap();
        let written = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let sink = written.clone();
        let mut checkpoints = ObjectCheckpoints {
            store,
            prefix,
            experiment: "e".into(),
            trial: "t".into(),
            spec_hash: "abc".into(),
            resume_from: None,
            runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            scratch: dir.join("scratch"),
            on_written: Box::new(move |w| sink.borrow_mut().push(w)),
        };
        std::fs::create_dir_all(dir.join("scratch")).unwrap();
        assert!(
            checkpoints.latest().unwrap().is_none(),
            "no checkpoint to resume from yet"
        );
        let weight = Tensor::from_slice(&[1.5f32, -2.0, 3.25]);
        checkpoints
            .save(
                7,
                &[("w".to_string(), weight.shallow_clone())],
                &json!({"step": 7, "optimizer_updates": 7}),
            )
            .unwrap();
        let w = written.borrow()[0].clone();
        assert_eq!(w.path, "experiments/e/trials/t/step-7.safetensors");
        assert!(dir.join(&w.path).exists(), "the object lands under the store's root");
        checkpoints.resume_from = Some(w.path.clone());
        let snapshot = checkpoints.latest().unwrap().unwrap();
        assert_eq!(snapshot.step, 7);
        assert_eq!(snapshot.sidecar["spec_hash"], "abc");
        let back = &snapshot.tensors["w"];
        assert_eq!(Vec::<f32>::try_from(back).unwrap(), vec![1.5, -2.0, 3.25]);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
