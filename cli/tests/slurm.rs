//! A real Slurm cluster (Debian's `slurm-wlm` and `munge`, run here without
//! systemd, listening on loopback only): two slurmd nodes with two fake GPUs
//! each run `deploy/slurm/ablate-workers.sbatch`; the workers register the
//! slots Slurm granted; `scancel` of one node's job mid-trial gives its trials
//! back at once, and they finish on the other node on an unbroken run's curves.

mod harness;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use harness::{assert_same_curves, curve, free_port, Guard, Stack};

/// munged, slurmctld and two slurmd, stopped when dropped.
struct Slurm {
    dir: PathBuf,
    conf: PathBuf,
    _daemons: Vec<Guard>,
}

impl Drop for Slurm {
    /// Job steps outlive the slurmd that started them: every process of this
    /// cluster's jobs (slurmstepd, srun, the workers) carries its SLURM_CONF.
    fn drop(&mut self) {
        let mark = format!("SLURM_CONF={}", self.conf.display());
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let environ = std::fs::read(entry.path().join("environ")).unwrap_or_default();
            if environ.split(|b| *b == 0).any(|kv| kv == mark.as_bytes()) && pid as u32 != std::process::id() {
                // SAFETY: signalling a process of this test's own cluster.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn sbin(name: &str) -> String {
    for dir in ["/usr/sbin", "/usr/bin"] {
        let path = format!("{dir}/{name}");
        if Path::new(&path).exists() {
            return path;
        }
    }
    panic!("{name} is missing: install Debian's slurm-wlm and munge (cargo xtask test does)");
}

fn background(mut command: Command, log: &Path) -> Guard {
    let log = std::fs::File::create(log).unwrap();
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    Guard(Some(command.spawn().unwrap_or_else(|e| panic!("{command:?}: {e}"))))
}

impl Slurm {
    fn start(dir: &Path) -> Slurm {
        let dir = dir.join("slurm");
        for sub in ["munge", "run", "state", "spool-n1", "spool-n2", "dev", "log"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        // munged refuses group- or world-writable or unreadable parents.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(dir.join("munge"), std::fs::Permissions::from_mode(0o711)).unwrap();
        std::fs::set_permissions(dir.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let key = dir.join("munge/munge.key");
        let made = Command::new(sbin("mungekey"))
            .arg("-c")
            .arg("-k")
            .arg(&key)
            .output()
            .unwrap();
        assert!(made.status.success(), "mungekey: {}", harness::stderr(&made));
        let socket = dir.join("run/munge.sock");
        let mut munged = Command::new(sbin("munged"));
        munged
            .arg("-F")
            .arg(format!("--key-file={}", key.display()))
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--pid-file={}", dir.join("run/munged.pid").display()))
            .arg(format!("--log-file={}", dir.join("log/munged.log").display()))
            .arg(format!("--seed-file={}", dir.join("munge/seed").display()));
        let mut daemons = vec![background(munged, &dir.join("log/munged.out"))];
        // Four fake GPUs, two per node: character devices, as gres.conf needs.
        for i in 0..4 {
            let dev = dir.join(format!("dev/nvidia{i}"));
            let made = Command::new("mknod").arg(&dev).args(["c", "1", "3"]).output().unwrap();
            assert!(made.status.success(), "mknod: {}", harness::stderr(&made));
        }
        let (ctld, n1, n2) = (free_port(), free_port(), free_port());
        let d = dir.display();
        let conf = dir.join("slurm.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=ablate-test
SlurmctldHost=localhost
SlurmctldPort={ctld}
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={socket}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=2
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
GresTypes=gpu
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
NodeName=n1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n1} CPUs=2 RealMemory=1000 Gres=gpu:2
NodeName=n2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={n2} CPUs=2 RealMemory=1000 Gres=gpu:2
PartitionName=test Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
",
                socket = socket.display()
            ),
        )
        .unwrap();
        std::fs::write(
            dir.join("gres.conf"),
            format!("NodeName=n1 Name=gpu File={d}/dev/nvidia[0-1]\nNodeName=n2 Name=gpu File={d}/dev/nvidia[2-3]\n"),
        )
        .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "munged did not start: {}",
                read(&dir.join("log/munged.out"))
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut ctld = Command::new(sbin("slurmctld"));
        ctld.args(["-D", "-i"]).env("SLURM_CONF", &conf);
        daemons.push(background(ctld, &dir.join("log/slurmctld.out")));
        for node in ["n1", "n2"] {
            let mut slurmd = Command::new(sbin("slurmd"));
            slurmd.args(["-D", "-N", node]).env("SLURM_CONF", &conf);
            daemons.push(background(slurmd, &dir.join(format!("log/slurmd-{node}.out"))));
        }
        let slurm = Slurm {
            dir,
            conf,
            _daemons: daemons,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let nodes = slurm
                .command("sinfo")
                .args(["-N", "-h", "-o", "%N %t"])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&nodes.stdout).to_string();
            if text.lines().filter(|l| l.ends_with(" idle")).count() == 2 {
                break;
            }
            assert!(Instant::now() < deadline, "nodes not idle: {text}\n{}", slurm.logs());
            std::thread::sleep(Duration::from_millis(200));
        }
        slurm
    }

    fn command(&self, program: &str) -> Command {
        let mut command = Command::new(program);
        command.env("SLURM_CONF", &self.conf);
        command
    }

    fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.dir.join("log")).unwrap().flatten() {
            out += &format!("--- {}\n{}\n", entry.path().display(), read(&entry.path()));
        }
        out
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

/// `sbatch` of the shipped script on one node, with two GPUs; returns the job id.
fn submit_workers(slurm: &Slurm, stack: &Stack, node: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/slurm/ablate-workers.sbatch");
    let out = slurm
        .command("sbatch")
        .args(["--parsable", "--nodes=1", "--gres=gpu:2", "-w", node])
        .arg(format!("--output={}/worker-{node}.log", stack.dir.display()))
        .arg(&script)
        .current_dir(&stack.dir)
        .env("ABLATE_COORDINATOR", stack.addr())
        .env("ABLATE_OBJECT_STORE", stack.dir.join("objects"))
        .env("ABLATE_TOKEN_FILE", stack.dir.join("worker.token"))
        .env("ABLATE_WORKER_BIN", harness::bin("ablate-worker"))
        .env("ABLATE_STATE_ROOT", &stack.dir)
        .env("ABLATE_WORKER_ARGS", "--poll-ms 50")
        // The fake GPUs' slots run their trials on the CPU.
        .env("ABLATE_GPU_STAND_IN", "cpu")
        .env("RUST_LOG", "info")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "sbatch: {}\n{}",
        harness::text(&out),
        slurm.logs()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[tokio::test(flavor = "multi_thread")]
async fn slurm_workers_take_their_granted_gpus_and_give_trials_back_on_scancel() {
    let stack = Stack::start(15.0).await;
    let slurm = Slurm::start(&stack.dir);
    let job1 = submit_workers(&slurm, &stack, "n1");
    let _job2 = submit_workers(&slurm, &stack, "n2");
    let logs = |stack: &Stack| {
        format!(
            "{}\n--- worker-n1\n{}\n--- worker-n2\n{}\n{}",
            stack.logs(),
            read(&stack.dir.join("worker-n1.log")),
            read(&stack.dir.join("worker-n2.log")),
            slurm.logs()
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let devices: Vec<Vec<String>> = sqlx::query_scalar("select devices from workers order by registered_at")
            .fetch_all(&stack.pool)
            .await
            .unwrap();
        if devices.len() == 2 {
            // Each node's two granted GPUs, numbered from 0 as CUDA numbers them.
            assert!(devices.iter().all(|d| d == &["cuda:0", "cuda:1"]), "{devices:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "workers did not register: {devices:?}\n{}",
            logs(&stack)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let spec = harness::resume_spec("slurm", 0..4);
    let experiment = stack.submit(&stack.write_spec("slurm.toml", &spec));
    // Mid-trial everywhere: all four trials (two per node) run and have checkpoints.
    stack
        .wait_for(
            "select count(*) = 4 from trials t where t.state = 'running'
               and exists (select 1 from checkpoints c where c.trial_id = t.id)",
            Duration::from_secs(60),
        )
        .await;
    let cancelled_at = Instant::now();
    let out = slurm.command("scancel").arg(&job1).output().unwrap();
    assert!(out.status.success(), "scancel: {}", harness::text(&out));
    // Node 1's daemon gives its trials back at once (well before their 15 s lease would expire).
    let released = || async {
        let log = read(&stack.dir.join("worker-n1.log"));
        log.contains("given back")
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !released().await {
        assert!(Instant::now() < deadline, "node 1 gave nothing back:\n{}", logs(&stack));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        cancelled_at.elapsed() < Duration::from_secs(5),
        "given back {:?} after scancel",
        cancelled_at.elapsed()
    );
    stack.wait_finished(&experiment, Duration::from_secs(180)).await;
    let states: Vec<(String, i64)> =
        sqlx::query_as("select state, count(*) from trials where experiment_id = $1::uuid group by state")
            .bind(&experiment)
            .fetch_all(&stack.pool)
            .await
            .unwrap();
    assert_eq!(states, [("succeeded".to_string(), 4)], "{}", logs(&stack));
    // A preempted trial's attempt is not counted, and nothing crashed.
    let crashed = stack
        .scalar_i64(&format!(
            "select count(*) from ablate.trial_attempts where experiment_id = '{experiment}' and outcome <> 'succeeded'"
        ))
        .await;
    assert_eq!(crashed, 0, "{}", logs(&stack));
    let resumed = stack
        .scalar_i64(&format!(
            "select count(distinct a.worker_id) from ablate.trial_attempts a where a.experiment_id = '{experiment}'"
        ))
        .await;
    assert_eq!(resumed, 1, "every trial finished on node 2:\n{}", logs(&stack));

    let unbroken = stack.submit(&stack.write_spec("unbroken.toml", &spec.replace("\"slurm\"", "\"unbroken\"")));
    stack.wait_finished(&unbroken, Duration::from_secs(180)).await;
    let (a, b) = (curve(&stack, &experiment).await, curve(&stack, &unbroken).await);
    assert_eq!(a.len(), 4 * 300, "every step exactly once");
    assert_same_curves(&a, &b);
}
