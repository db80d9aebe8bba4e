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
#[derive(Debug, Clone, PartialEq)]
pub struct Slot {
    /// `cpu:N` (the N-th CPU slot) or `cuda:N`.
    pub name: String,
    /// The device a trial in this slot uses: `cpu` or `cuda:N`.
    pub device: String,
    /// Intra-op threads for a trial in this slot.
    pub threads: usize,
}

/// Turns `--devices` into slots: `auto`, `cpu:K` (K CPU slots) or `cuda:0,cuda:1`
/// (`cuda:0*4`: four slots sharing device 0).
pub fn discover(spec: &str, backend: &Backend) -> anyhow::Result<Vec<Slot>> {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    let cpu_slots = |k: usize| {
        (0..k)
            .map(|i| Slot {
                name: format!("cpu:{i}"),
                device: "cpu".into(),
                threads: (cores / k).max(1),
            })
            .collect::<Vec<_>>()
    };
    let spec = spec.trim();
    if spec == "auto" {
        return Ok(if backend.cuda_devices > 0 {
            (0..backend.cuda_devices)
                .map(|i| Slot {
                    name: format!("cuda:{i}"),
                    device: format!("cuda:{i}"),
                    threads: 1,
                })
                .collect()
        } else {
            cpu_slots(cores)
        });
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
                anyhow::anyhow!("--devices: `{part}` is not cuda:N; expected auto, cpu:K or cuda:0,cuda:1 (cuda:0*4 for 4 slots on one device)")
            })?;
        if index >= backend.cuda_devices {
            anyhow::bail!(
                "--devices: cuda:{index} is not available; this host's backend is {}",
                backend.note
            );
        }
        for k in 0..share {
            slots.push(Slot {
                name: if share == 1 {
                    format!("cuda:{index}")
                } else {
                    format!("cuda:{index}#{k}")
                },
                device: format!("cuda:{index}"),
                threads: 1,
            });
        }
    }
    Ok(slots)
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
        assert!(err.contains("expected auto, cpu:K or cuda:0,cuda:1"), "{err}");
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
}
