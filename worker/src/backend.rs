//! Which libtorch backend is live, and the device slots this host offers.
//!
//! The linker drops `libtorch_cuda.so` because nothing refers to it by name,
//! so CUDA would look absent. Loading it at start-up (RTLD_NOW | RTLD_GLOBAL)
//! lets one binary serve a CPU-only libtorch and a GPU machine alike.

use std::ffi::CString;

#[derive(Debug, Clone)]
pub struct Backend {
    pub cuda_devices: usize,
    pub note: String,
}

fn load_cuda() -> Result<(), String> {
    let name = CString::new("libtorch_cuda.so").expect("no NUL in a literal");
    // SAFETY: dlopen with a valid C string; the handle is kept for the process's life.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        // SAFETY: dlerror returns a valid C string or null.
        let err = unsafe { libc::dlerror() };
        let reason = if err.is_null() {
            "unknown reason".to_string()
        } else {
            // SAFETY: non-null, NUL-terminated, owned by libc until the next dl call.
            unsafe { std::ffi::CStr::from_ptr(err) }.to_string_lossy().into_owned()
        };
        return Err(reason);
    }
    Ok(())
}

fn detect() -> Backend {
    match load_cuda() {
        Ok(()) if tch::Cuda::is_available() => {
            let n = tch::Cuda::device_count() as usize;
            Backend {
                cuda_devices: n,
                note: format!("cuda ({n} device(s))"),
            }
        }
        Ok(()) => Backend {
            cuda_devices: 0,
            note: "cpu (libtorch_cuda loaded, but no CUDA device is visible)".into(),
        },
        Err(reason) => Backend {
            cuda_devices: 0,
            note: format!("cpu (libtorch_cuda not loaded: {reason})"),
        },
    }
}

/// Loads the CUDA backend where there is one and logs which backend is live.
pub fn init() -> Backend {
    let backend = detect();
    tracing::info!(backend = %backend.note, "libtorch backend");
    backend
}

/// As [`init`], without the log line (trial processes).
pub fn init_quiet() -> Backend {
    detect()
}

/// One device slot: runs one trial at a time.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Slot {
    /// `cpu:N` (the N-th CPU slot), `cuda:N`, `cuda:N#K` (the K-th slot sharing
    /// device N), or for a trial of several GPUs `cuda:0+cuda:1`.
    pub name: String,
    /// The device a trial in this slot uses: `cpu` or `cuda:N`.
    pub device: String,
    /// Intra-op threads for a trial in this slot.
    pub threads: usize,
    /// `CUDA_VISIBLE_DEVICES` for its trial process (a trial of several GPUs);
    /// `None`: the daemon's own.
    pub visible_devices: Option<String>,
    /// The slots a trial of several GPUs took together; empty for one slot.
    pub parts: Vec<Slot>,
}

impl Slot {
    pub fn new(name: String, device: String, threads: usize) -> Slot {
        Slot {
            name,
            device,
            threads,
            ..Slot::default()
        }
    }

    /// The GPU this slot runs on (`cuda:N`, also where `cuda:N#K` shares it
    /// or a stand-in runs it on the CPU); `None` for a CPU slot.
    pub fn gpu(&self) -> Option<&str> {
        self.name
            .starts_with("cuda:")
            .then(|| self.name.split('#').next().unwrap_or(&self.name))
    }

    /// One slot for a trial of several GPUs, from slots on distinct GPUs: its
    /// process sees just those GPUs (`CUDA_VISIBLE_DEVICES`, mapped through the
    /// daemon's own, as Slurm sets it) and trains on the first, `cuda:0`.
    pub fn group(parts: Vec<Slot>, daemon_visible: Option<&str>) -> Slot {
        let granted: Vec<String> = daemon_visible
            .map(|v| v.split(',').map(|d| d.trim().to_string()).collect())
            .unwrap_or_default();
        let physical: Vec<String> = parts
            .iter()
            .filter_map(|p| p.gpu())
            .filter_map(|gpu| gpu.strip_prefix("cuda:")?.parse::<usize>().ok())
            .map(|n| granted.get(n).cloned().unwrap_or_else(|| n.to_string()))
            .collect();
        let on_cpu = parts.iter().all(|p| p.device == "cpu");
        Slot {
            name: parts.iter().filter_map(|p| p.gpu()).collect::<Vec<_>>().join("+"),
            device: if on_cpu { "cpu".into() } else { "cuda:0".into() },
            threads: parts.iter().map(|p| p.threads).max().unwrap_or(1),
            visible_devices: Some(physical.join(",")),
            parts,
        }
    }
}

/// The memory one slot offers a fused group, in bytes (0: unknown): a GPU's
/// memory shared among the slots on it, or the host's available memory among all slots.
pub fn slot_memory(slots: &[Slot]) -> u64 {
    let Some(first) = slots.first() else {
        return 0;
    };
    let sharing = slots.iter().filter(|s| s.device == first.device).count().max(1) as u64;
    match first.gpu() {
        Some(_) => crate::telemetry::gpu_memory_total(&first.device).unwrap_or(0) / sharing,
        None => {
            let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
            let available_kib: u64 = meminfo
                .lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap_or(0);
            available_kib * 1024 / slots.len().max(1) as u64
        }
    }
}

/// Turns `--devices` into slots: `auto`, `cpu:K` (K CPU slots) or `cuda:0,cuda:1`
/// (`cuda:0*4`: four slots sharing device 0).
pub fn discover(spec: &str, backend: &Backend) -> anyhow::Result<Vec<Slot>> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu_slots = |k: usize| {
        (0..k)
            .map(|i| Slot::new(format!("cpu:{i}"), "cpu".into(), (cores / k).max(1)))
            .collect::<Vec<_>>()
    };
    let spec = spec.trim();
    if spec == "auto" {
        return Ok(if backend.cuda_devices > 0 {
            (0..backend.cuda_devices)
                .map(|i| Slot::new(format!("cuda:{i}"), format!("cuda:{i}"), 1))
                .collect()
        } else {
            cpu_slots(cores)
        });
    }
    if spec == "slurm" {
        return slurm_slots(backend, &|name| std::env::var(name).ok());
    }
    if let Some(k) = spec.strip_prefix("cpu:") {
        let k: usize = k
            .parse()
            .ok()
            .filter(|k| *k > 0)
            .ok_or_else(|| anyhow::anyhow!("--devices {spec}: expected cpu:K with K >= 1 slots"))?;
        return Ok(cpu_slots(k));
    }
    let mut slots = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        // cuda:N*K: K slots sharing device N (small trials that cannot fill a GPU alone).
        let (device, share) = match part.split_once('*') {
            Some((device, k)) => (
                device,
                k.parse::<usize>().ok().filter(|k| *k > 0).ok_or_else(|| {
                    anyhow::anyhow!("--devices: `{part}`: expected cuda:N*K with K >= 1 slots on device N")
                })?,
            ),
            None => (part, 1),
        };
        let index: usize = device
            .strip_prefix("cuda:")
            .and_then(|i| i.parse().ok())
            .ok_or_else(|| {
                anyhow::anyhow!("--devices: `{part}` is not cuda:N; expected auto, slurm, cpu:K or cuda:0,cuda:1 (cuda:0*4 for 4 slots on one device)")
            })?;
        if index >= backend.cuda_devices {
            anyhow::bail!(
                "--devices: cuda:{index} is not available; this host's backend is {}",
                backend.note
            );
        }
        for k in 0..share {
            let name = if share == 1 {
                format!("cuda:{index}")
            } else {
                format!("cuda:{index}#{k}")
            };
            slots.push(Slot::new(name, format!("cuda:{index}"), 1));
        }
    }
    Ok(slots)
}

/// The slots of what Slurm granted this node's task: one per GPU in
/// `CUDA_VISIBLE_DEVICES` (else `SLURM_JOB_GPUS`), which CUDA numbers from 0;
/// without GPUs, one single-thread slot per CPU in `SLURM_CPUS_ON_NODE`.
/// With `ABLATE_GPU_STAND_IN=cpu` the granted GPUs' slots run their trials on
/// the CPU (to try a cluster's wiring where its GPUs are fake).
fn slurm_slots(backend: &Backend, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<Vec<Slot>> {
    let list = |name: &str| {
        env(name)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).count())
            .filter(|n| *n > 0)
    };
    let stand_in = env("ABLATE_GPU_STAND_IN").is_some_and(|v| v == "cpu");
    if let Some(gpus) = list("CUDA_VISIBLE_DEVICES").or_else(|| list("SLURM_JOB_GPUS")) {
        if !stand_in && gpus > backend.cuda_devices {
            anyhow::bail!(
                "--devices slurm: Slurm granted {gpus} GPU(s) but libtorch sees {}; this host's backend is {}",
                backend.cuda_devices,
                backend.note
            );
        }
        return Ok((0..gpus)
            .map(|i| {
                Slot::new(
                    format!("cuda:{i}"),
                    if stand_in { "cpu".into() } else { format!("cuda:{i}") },
                    1,
                )
            })
            .collect());
    }
    let cpus: usize = env("SLURM_CPUS_ON_NODE")
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .ok_or_else(|| {
            anyhow::anyhow!(
                "--devices slurm: no GPUs (CUDA_VISIBLE_DEVICES, SLURM_JOB_GPUS) and no SLURM_CPUS_ON_NODE; run it inside a Slurm job step (srun)"
            )
        })?;
    Ok((0..cpus)
        .map(|i| Slot::new(format!("cpu:{i}"), "cpu".into(), 1))
        .collect())
}

/// Parses `cpu` or `cuda:N` into a tch device.
pub fn device(name: &str) -> anyhow::Result<tch::Device> {
    if name == "cpu" {
        return Ok(tch::Device::Cpu);
    }
    name.strip_prefix("cuda:")
        .and_then(|i| i.parse().ok())
        .map(tch::Device::Cuda)
        .ok_or_else(|| anyhow::anyhow!("unknown device `{name}`, expected cpu or cuda:N"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trial_of_several_gpus_sees_the_granted_ones() {
        let four = Backend {
            cuda_devices: 4,
            note: "cuda".into(),
        };
        let slots = discover("cuda:0*2,cuda:1,cuda:3", &four).unwrap();
        assert_eq!(
            slots.iter().map(|s| s.gpu()).collect::<Vec<_>>(),
            [Some("cuda:0"), Some("cuda:0"), Some("cuda:1"), Some("cuda:3")]
        );
        assert_eq!(Slot::new("cpu:0".into(), "cpu".into(), 1).gpu(), None);
        // Without a daemon-wide CUDA_VISIBLE_DEVICES, the indices are the physical ones.
        let group = Slot::group(vec![slots[1].clone(), slots[3].clone()], None);
        assert_eq!(group.name, "cuda:0+cuda:3");
        assert_eq!(group.device, "cuda:0");
        assert_eq!(group.visible_devices.as_deref(), Some("0,3"));
        assert_eq!(group.parts.len(), 2);
        // Under Slurm's CUDA_VISIBLE_DEVICES=4,5,6,7 the daemon's cuda:1 and cuda:3 are GPUs 5 and 7.
        let group = Slot::group(vec![slots[2].clone(), slots[3].clone()], Some("4,5,6,7"));
        assert_eq!(group.visible_devices.as_deref(), Some("5,7"));
        // A stand-in on the CPU stays on the CPU.
        let stand_in: Vec<Slot> = (0..2)
            .map(|i| Slot::new(format!("cuda:{i}"), "cpu".into(), 1))
            .collect();
        assert_eq!(Slot::group(stand_in, Some("0,1")).device, "cpu");
    }

    #[test]
    fn device_specs_become_slots_or_clear_errors() {
        let cpu_only = Backend {
            cuda_devices: 0,
            note: "cpu".into(),
        };
        let slots = discover("cpu:2", &cpu_only).unwrap();
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[1].name, "cpu:1");
        assert_eq!(slots[0].device, "cpu");
        assert!(slots[0].threads >= 1);
        assert!(!discover("auto", &cpu_only).unwrap().is_empty());
        let err = discover("cuda:0", &cpu_only).unwrap_err().to_string();
        assert!(err.contains("not available"), "{err}");
        let err = discover("cpu:0", &cpu_only).unwrap_err().to_string();
        assert!(err.contains("K >= 1"), "{err}");
        let err = discover("gpu", &cpu_only).unwrap_err().to_string();
        assert!(err.contains("expected auto, slurm, cpu:K or cuda:0,cuda:1"), "{err}");
        let two_gpus = Backend {
            cuda_devices: 2,
            note: "cuda".into(),
        };
        let slots = discover("auto", &two_gpus).unwrap();
        assert_eq!(
            slots.iter().map(|s| s.device.as_str()).collect::<Vec<_>>(),
            ["cuda:0", "cuda:1"]
        );
        let shared = discover("cuda:0*3,cuda:1", &two_gpus).unwrap();
        assert_eq!(
            shared
                .iter()
                .map(|s| (s.name.as_str(), s.device.as_str()))
                .collect::<Vec<_>>(),
            [
                ("cuda:0#0", "cuda:0"),
                ("cuda:0#1", "cuda:0"),
                ("cuda:0#2", "cuda:0"),
                ("cuda:1", "cuda:1")
            ]
        );
        let err = discover("cuda:0*0", &two_gpus).unwrap_err().to_string();
        assert!(err.contains("K >= 1"), "{err}");
    }

    #[test]
    fn slurm_grants_become_slots() {
        let env = |vars: &'static [(&'static str, &'static str)]| {
            move |name: &str| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string())
        };
        let two_gpus = Backend {
            cuda_devices: 2,
            note: "cuda".into(),
        };
        let cpu_only = Backend {
            cuda_devices: 0,
            note: "cpu".into(),
        };
        let names = |slots: Vec<Slot>| slots.into_iter().map(|s| (s.name, s.device)).collect::<Vec<_>>();
        // CUDA numbers the granted devices from 0 whatever their ids on the node.
        let slots = slurm_slots(
            &two_gpus,
            &env(&[("CUDA_VISIBLE_DEVICES", "2,3"), ("SLURM_CPUS_ON_NODE", "8")]),
        )
        .unwrap();
        assert_eq!(
            names(slots),
            [("cuda:0".into(), "cuda:0".into()), ("cuda:1".into(), "cuda:1".into())]
        );
        let slots = slurm_slots(&two_gpus, &env(&[("SLURM_JOB_GPUS", "1")])).unwrap();
        assert_eq!(slots.len(), 1);
        let err = slurm_slots(&cpu_only, &env(&[("CUDA_VISIBLE_DEVICES", "0,1")]))
            .unwrap_err()
            .to_string();
        assert!(err.contains("granted 2 GPU(s) but libtorch sees 0"), "{err}");
        let slots = slurm_slots(
            &cpu_only,
            &env(&[("CUDA_VISIBLE_DEVICES", "0,1"), ("ABLATE_GPU_STAND_IN", "cpu")]),
        )
        .unwrap();
        assert_eq!(
            names(slots),
            [("cuda:0".into(), "cpu".into()), ("cuda:1".into(), "cpu".into())]
        );
        let slots = slurm_slots(
            &cpu_only,
            &env(&[("CUDA_VISIBLE_DEVICES", ""), ("SLURM_CPUS_ON_NODE", "3")]),
        )
        .unwrap();
        assert_eq!(slots.len(), 3);
        assert!(slots.iter().all(|s| s.device == "cpu" && s.threads == 1));
        let err = slurm_slots(&cpu_only, &env(&[])).unwrap_err().to_string();
        assert!(err.contains("inside a Slurm job step"), "{err}");
    }
}
