//! Checkpoints through a real S3 server (moto's, started here; `cargo xtask
//! test` installs it and sets ABLATE_MOTO_BIN), with the same store the
//! trial process uses for `--object-store s3://bucket/prefix`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ablate_experiments::trial::CheckpointStore;
use ablate_worker::storage::{self, ObjectCheckpoints};
use serde_json::json;
use tch::Tensor;

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn moto_bin() -> std::path::PathBuf {
    std::env::var_os("ABLATE_MOTO_BIN")
        .map(std::path::PathBuf::from)
        .expect("ABLATE_MOTO_BIN must name the bin directory of a venv with moto[server]; `cargo xtask test` sets it")
}

fn start_moto() -> (Server, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(moto_bin().join("moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "moto_server did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    (server, format!("http://127.0.0.1:{port}"))
}

fn create_bucket(endpoint: &str, bucket: &str) {
    let script = format!(
        "import boto3; boto3.client('s3', endpoint_url='{endpoint}', aws_access_key_id='test', \
         aws_secret_access_key='test', region_name='us-east-1').create_bucket(Bucket='{bucket}')"
    );
    let status = Command::new(moto_bin().join("python"))
        .args(["-c", &script])
        .status()
        .unwrap();
    assert!(status.success(), "could not create bucket {bucket}");
}

#[test]
fn checkpoints_round_trip_through_s3() {
    let (_server, endpoint) = start_moto();
    create_bucket(&endpoint, "ablate-ckpt");
    for (key, value) in [
        ("AWS_ENDPOINT", endpoint.as_str()),
        ("AWS_ALLOW_HTTP", "true"),
        ("AWS_ACCESS_KEY_ID", "test"),
        ("AWS_SECRET_ACCESS_KEY", "test"),
        ("AWS_REGION", "us-east-1"),
    ] {
        std::env::set_var(key, value);
    }
    let (store, prefix) = storage::open("s3://ablate-ckpt/team/run-1").unwrap();
    let scratch = std::env::temp_dir().join(format!("ablate-s3-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).unwrap();
    let written = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
    let sink = written.clone();
    let mut checkpoints = ObjectCheckpoints {
        store: store.clone(),
        prefix,
        experiment: "e1".into(),
        trial: "t1".into(),
        spec_hash: "h".into(),
        resume_from: None,
        runtime: tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap(),
        scratch: scratch.clone(),
        on_written: Box::new(move |w| sink.borrow_mut().push(w)),
    };
    let weight = Tensor::from_slice(&[0.5f32, 1.5, -4.0]);
    checkpoints
        .save(
            12,
            &[("w".to_string(), weight)],
            &json!({"step": 12, "optimizer_updates": 12}),
        )
        .unwrap();
    let path = written.borrow()[0].path.clone();
    assert_eq!(path, "team/run-1/experiments/e1/trials/t1/step-12.safetensors");
    checkpoints.resume_from = Some(path);
    let snapshot = checkpoints.latest().unwrap().expect("the checkpoint is in S3");
    assert_eq!(snapshot.step, 12);
    assert_eq!(
        Vec::<f32>::try_from(&snapshot.tensors["w"]).unwrap(),
        vec![0.5, 1.5, -4.0]
    );
    let listed = checkpoints
        .runtime
        .block_on(async {
            use futures::TryStreamExt;
            let prefix = object_store::path::Path::from("team/run-1");
            store.list(Some(&prefix)).try_collect::<Vec<_>>().await
        })
        .unwrap();
    assert_eq!(listed.len(), 2, "the tensors and their JSON sidecar");
    let _ = std::fs::remove_dir_all(&scratch);
}
