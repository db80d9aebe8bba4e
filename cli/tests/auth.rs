//! Who may do what, with `ablate serve --auth`: every RPC of both services
//! refuses a missing, unknown, expired or revoked token; a token of the wrong
//! role is refused naming the roles that may; researchers cancel only their
//! own experiments; a worker with a worker token runs a sweep; no token shows
//! up in any log. Real coordinator, worker and PostgreSQL.

mod harness;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ablate_coordinator::policy::{self, Role};
use ablate_schema::proto::{self, experiments_client::ExperimentsClient, workers_client::WorkersClient};
use ablate_schema::Bearer;
use harness::{bin, Stack};
use tonic::Code;

/// Runs `ablate` against the stack with `token`.
fn ablate_as(stack: &Stack, token: &str, args: &[&str]) -> std::process::Output {
    let mut command = Command::new(bin("ablate"));
    command
        .args(args)
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_TOKEN", token)
        .env("XDG_CONFIG_HOME", stack.dir.join("config"))
        .env("RUST_LOG", "warn");
    if let Some(ca) = &stack.tls_ca {
        command.env("ABLATE_CA", ca);
    }
    command.output().unwrap()
}

fn create_token(stack: &Stack, admin: &str, role: &str, name: &str, expires: Option<&str>) -> String {
    let mut args = vec!["token", "create", "--role", role, "--name", name];
    if let Some(e) = expires {
        args.extend(["--expires", e]);
    }
    let out = ablate_as(stack, admin, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// Calls every RPC of both services with `token` (requests that are well-formed
/// enough to reach a handler); returns each method's status code.
async fn call_every_rpc(addr: &str, token: Option<&str>) -> Vec<(&'static str, Code)> {
    let channel = tonic::transport::Endpoint::from_shared(addr.to_string())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let bearer = Bearer::new(token).unwrap();
    let mut e = ExperimentsClient::with_interceptor(channel.clone(), bearer.clone());
    let mut w = WorkersClient::with_interceptor(channel, bearer);
    let code = |r: Result<(), tonic::Status>| r.err().map_or(Code::Ok, |s| s.code());
    let id = uuid::Uuid::new_v4().to_string();
    let get = || proto::GetExperimentRequest {
        experiment_id: id.clone(),
        best: 1,
    };
    vec![
        (
            "Submit",
            code(e.submit(proto::SubmitRequest::default()).await.map(drop)),
        ),
        ("GetExperiment", code(e.get_experiment(get()).await.map(drop))),
        (
            "ListExperiments",
            code(
                e.list_experiments(proto::ListExperimentsRequest::default())
                    .await
                    .map(drop),
            ),
        ),
        (
            "Cancel",
            code(
                e.cancel(proto::CancelRequest {
                    experiment_id: id.clone(),
                })
                .await
                .map(drop),
            ),
        ),
        ("Watch", code(e.watch(get()).await.map(drop))),
        (
            "ListWorkers",
            code(e.list_workers(proto::ListWorkersRequest {}).await.map(drop)),
        ),
        (
            "Query",
            code(
                e.query(proto::QueryRequest {
                    sql: "select 1".into(),
                    timeout_ms: 0,
                })
                .await
                .map(drop),
            ),
        ),
        ("Report", code(e.report(get()).await.map(drop))),
        (
            "ReaderUrl",
            code(e.reader_url(proto::ReaderUrlRequest {}).await.map(drop)),
        ),
        (
            "CreateToken",
            code(e.create_token(proto::CreateTokenRequest::default()).await.map(drop)),
        ),
        (
            "ListTokens",
            code(e.list_tokens(proto::ListTokensRequest {}).await.map(drop)),
        ),
        (
            "RevokeToken",
            code(e.revoke_token(proto::RevokeTokenRequest::default()).await.map(drop)),
        ),
        (
            "Register",
            code(w.register(proto::RegisterRequest::default()).await.map(drop)),
        ),
        ("Lease", code(w.lease(proto::LeaseRequest::default()).await.map(drop))),
        (
            "Heartbeat",
            code(w.heartbeat(proto::HeartbeatRequest::default()).await.map(drop)),
        ),
        (
            "StreamMetrics",
            code(
                w.stream_metrics(tokio_stream::iter(Vec::<proto::MetricBatch>::new()))
                    .await
                    .map(drop),
            ),
        ),
        (
            "ReportCheckpoint",
            code(w.report_checkpoint(proto::CheckpointReport::default()).await.map(drop)),
        ),
        (
            "Complete",
            code(w.complete(proto::CompleteRequest::default()).await.map(drop)),
        ),
        (
            "Release",
            code(w.release(proto::ReleaseRequest::default()).await.map(drop)),
        ),
    ]
}

/// Calls the method at `path` with an empty message and `token`: the door (the access
/// policy) answers before any handler reads the message. A call that got past the door
/// and is still running after 10 s counts as let through.
async fn knock(channel: tonic::transport::Channel, token: &str, path: &'static str) -> Code {
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut request = tonic::Request::new(());
    request
        .metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    match tokio::time::timeout(Duration::from_secs(10), grpc.unary(request, path, codec)).await {
        Ok(result) => result.err().map_or(Code::Ok, |s| s.code()),
        Err(_) => Code::DeadlineExceeded,
    }
}

const EXPERIMENTS: &[&str] = &[
    "Submit",
    "GetExperiment",
    "ListExperiments",
    "Cancel",
    "Watch",
    "ListWorkers",
    "Query",
    "Report",
];
/// Admin-only methods.
const TOKENS: &[&str] = &["ReaderUrl", "CreateToken", "ListTokens", "RevokeToken"];

fn write_secret(path: &Path, token: &str) {
    std::fs::write(path, format!("{token}\n")).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn every_call_needs_a_valid_token_of_a_role_that_may_make_it() {
    let mut stack = Stack::start(15.0).await;
    let admin_file = stack.dir.join("admin.token");
    let admin = stack.admin_token.clone();
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&admin_file).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600, "the admin token file is private");

    let alice = create_token(&stack, &admin, "researcher", "alice", None);
    let bob = create_token(&stack, &admin, "researcher", "bob", None);
    let worker = create_token(&stack, &admin, "worker", "node-1", None);
    let soon = create_token(&stack, &admin, "researcher", "short-lived", Some("1s"));
    let gone = create_token(&stack, &admin, "researcher", "leaver", None);
    let out = ablate_as(&stack, &admin, &["token", "revoke", "leaver"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Refused, whoever they claim to be, on every RPC of both services.
    let addr = stack.addr();
    for (what, token) in [
        ("no token", None),
        ("an unknown token", Some("abl_not-a-token")),
        ("an expired token", Some(soon.as_str())),
        ("a revoked token", Some(gone.as_str())),
    ] {
        for (method, code) in call_every_rpc(&addr, token).await {
            assert_eq!(code, Code::Unauthenticated, "{method} with {what}");
        }
    }
    // The wrong role is refused; the right one gets past the door.
    for (method, code) in call_every_rpc(&addr, Some(&worker)).await {
        let denied = EXPERIMENTS.contains(&method) || TOKENS.contains(&method);
        assert_eq!(
            code == Code::PermissionDenied,
            denied,
            "{method} with a worker token: {code:?}"
        );
    }
    for (method, code) in call_every_rpc(&addr, Some(&alice)).await {
        let denied = !EXPERIMENTS.contains(&method);
        assert_eq!(
            code == Code::PermissionDenied,
            denied,
            "{method} with a researcher token: {code:?}"
        );
    }
    // Every method of the access policy, by its path: a researcher reaches no admin method
    // and none of the workers', a worker nothing but the lease protocol.
    let channel = tonic::transport::Endpoint::from_shared(addr.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for (path, access) in policy::GRPC {
        for (role, token) in [(Role::Researcher, &alice), (Role::Worker, &worker)] {
            let code = knock(channel.clone(), token, path).await;
            let allowed = policy::check(*access, role).is_ok();
            assert_eq!(
                code == Code::PermissionDenied,
                !allowed,
                "{path} with a {} token: {code:?}",
                role.as_str()
            );
        }
    }
    // A method the policy does not list is refused, even to an admin.
    assert_eq!(
        knock(channel.clone(), &admin, "/ablate.v1.Experiments/NotInThePolicy").await,
        Code::PermissionDenied
    );
    for (method, code) in call_every_rpc(&addr, Some(&admin)).await {
        assert!(
            !matches!(code, Code::PermissionDenied | Code::Unauthenticated),
            "{method} with an admin token: {code:?}"
        );
    }
    let out = ablate_as(&stack, &worker, &["sql", "select 1"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("needs a researcher or admin token"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Experiments record who submitted them; only they or an admin may cancel.
    let spec = stack.write_spec(
        "owned.toml",
        "name = \"owned\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.01\nsteps = 30\nstep_delay_ms = 50\n\
         [sweep]\nsearcher = \"grid\"\nparams.seed = [0, 1, 2, 3]\n",
    );
    let out = ablate_as(&stack, &alice, &["submit", &spec.to_string_lossy()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let experiment = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = ablate_as(
        &stack,
        &alice,
        &["sql", "select submitted_by from ablate.experiments", "--format", "csv"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), "submitted_by\nalice\n");
    let out = ablate_as(&stack, &bob, &["cancel", &experiment]);
    assert!(!out.status.success(), "bob cancelled alice's experiment");
    assert!(String::from_utf8_lossy(&out.stderr).contains("submitted by alice"));

    // A worker with its token runs the sweep.
    let token_file = stack.dir.join("worker.token");
    write_secret(&token_file, &worker);
    std::fs::set_permissions(&token_file, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    stack.start_worker_from(
        &bin("ablate-worker"),
        "cpu:2",
        &["--token-file", &token_file.to_string_lossy()],
    );
    let out = ablate_as(&stack, &alice, &["watch", &experiment]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );
    let spec2 = stack.write_spec(
        "cancel-me.toml",
        &std::fs::read_to_string(&spec).unwrap().replace("owned", "cancel-me"),
    );
    let out = ablate_as(&stack, &bob, &["submit", &spec2.to_string_lossy()]);
    let second = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let out = ablate_as(&stack, &admin, &["cancel", &second]);
    assert!(
        out.status.success(),
        "an admin cancels anyone's: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // No secret in any log line.
    let logs = stack.logs();
    for secret in [&admin, &alice, &bob, &worker, &soon, &gone] {
        assert!(!logs.contains(secret.as_str()), "a token appears in the logs");
    }
}

/// A CA and a certificate it signs for 127.0.0.1: (ca.pem, cert.pem, key.pem) under `dir`.
fn make_pki(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let paths = (
        dir.join(format!("{name}-ca.pem")),
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

#[tokio::test(flavor = "multi_thread")]
async fn tls_is_checked_both_ways_and_a_bare_network_listener_is_refused() {
    let mut stack = Stack::start(15.0).await;
    let (ca, cert, key) = make_pki(&stack.dir, "ours");
    let (other_ca, _, _) = make_pki(&stack.dir, "theirs");
    stack.kill_coordinator();
    stack.coordinator_args = [
        "--tls-cert",
        &cert.to_string_lossy(),
        "--tls-key",
        &key.to_string_lossy(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    stack.tls_ca = Some(ca.clone());
    stack.start_coordinator().await;
    let admin = stack.admin_token.clone();

    // Trusting our CA: a real handshake, and the sweep runs over it.
    let out = ablate_as(&stack, &admin, &["workers"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let worker = create_token(&stack, &admin, "worker", "tls-node", None);
    let token_file = stack.dir.join("tls-node.token");
    write_secret(&token_file, &worker);
    stack.start_worker_from(
        &bin("ablate-worker"),
        "cpu:1",
        &["--token-file", &token_file.to_string_lossy()],
    );
    let spec = stack.write_spec(
        "tls.toml",
        "name = \"tls\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.01\nsteps = 20\n\
         [sweep]\nsearcher = \"grid\"\nparams.seed = [0, 1]\n",
    );
    let out = ablate_as(&stack, &admin, &["submit", "--wait", &spec.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        stack.logs()
    );

    // Trusting another CA: no connection.
    let mut other = Command::new(bin("ablate"));
    other
        .args(["workers"])
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_CA", &other_ca)
        .env("ABLATE_TOKEN", &admin);
    let out = other.output().unwrap();
    assert!(!out.status.success(), "a client trusting another CA connected");
    // Plaintext to the TLS listener: no answer either.
    let plain = stack.addr().replace("https://", "http://");
    let out = Command::new(bin("ablate"))
        .args(["--coordinator", &plain, "workers"])
        .env("ABLATE_TOKEN", &admin)
        .env_remove("ABLATE_CA")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a plaintext client talked to the TLS listener");

    // A listener beyond this host needs TLS and tokens, or --insecure.
    let out = Command::new(bin("ablate"))
        .args(["serve", "--database-url", &stack.db_url, "--listen"])
        .arg(format!("0.0.0.0:{}", harness::free_port()))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(said.contains("--tls-cert") && said.contains("--insecure"), "{said}");
    assert!(!stack.logs().contains(admin.as_str()), "a token appears in the logs");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reader_login_reads_every_view_and_nothing_else() {
    let stack = Stack::start(15.0).await;
    let spec = stack.write_spec(
        "r.toml",
        "name = \"r\"\nfamily = \"train\"\n[base]\noptimizer = \"adam\"\nlr = 0.01\nsteps = 5\n\
         [sweep]\nsearcher = \"grid\"\nparams.seed = [0]\n",
    );
    stack.submit(&spec);
    let out = stack.ablate(&["db", "reader-url"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let url = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(url.contains("ablate_reader_login:"), "{url}");
    let reader = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .connect(&url)
        .await
        .unwrap();
    let views: Vec<(String,)> =
        sqlx::query_as("select table_name::text from information_schema.views where table_schema = 'ablate'")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert!(views.len() >= 7, "{views:?}");
    for (view,) in &views {
        let sql = format!("select count(*) from ablate.{view}");
        let n: Result<i64, _> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).fetch_one(&reader).await;
        assert!(n.is_ok(), "ablate.{view}: {n:?}");
    }
    for table in [
        "experiments",
        "trials",
        "metrics",
        "tokens",
        "workers",
        "checkpoints",
        "trial_attempts",
    ] {
        let read = sqlx::query(sqlx::AssertSqlSafe(format!("select * from public.{table} limit 1")))
            .fetch_all(&reader)
            .await;
        assert!(read.is_err(), "the reader read table {table}");
    }
    for write in [
        "delete from ablate.experiments",
        "update public.trials set state = 'failed'",
        "insert into public.metric_names (name) values ('x')",
        "create table public.mine (x int)",
    ] {
        assert!(
            sqlx::query(write).execute(&reader).await.is_err(),
            "the reader ran: {write}"
        );
    }
}
