//! What a worker runs trials on and with, reported with every attempt's end:
//! the ablate version and the commit it was built from, the libtorch and CUDA
//! versions of the libtorch it loaded, each slot's device name, the host.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::backend::Slot;

#[derive(Debug, Clone, Serialize)]
pub struct Provenance {
    pub ablate_version: String,
    pub git_commit: String,
    pub libtorch_version: String,
    pub cuda_version: String,
    pub host: String,
    /// Device (`cpu`, `cuda:0`) to its name (the CPU model, the GPU's name).
    pub device_names: BTreeMap<String, String>,
}

impl Provenance {
    /// Gathers it for `slots`' devices; anything unknown reads `unknown` (the host: `localhost`).
    pub fn gather(slots: &[Slot]) -> Provenance {
        let (libtorch_version, cuda_version) = libtorch_versions();
        let mut device_names = BTreeMap::new();
        for slot in slots {
            device_names
                .entry(slot.device.clone())
                .or_insert_with(|| device_name(&slot.device));
        }
        Provenance {
            ablate_version: env!("CARGO_PKG_VERSION").to_string(),
            git_commit: env!("ABLATE_GIT_COMMIT").to_string(),
            libtorch_version,
            cuda_version,
            host: std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "localhost".into()),
            device_names,
        }
    }

    /// The JSON object a completion carries for a trial in `slot`: its device,
    /// and for a trial of several GPUs the slot's name (`gpus`: `cuda:0+cuda:1`) and the
    /// `CUDA_VISIBLE_DEVICES` its process had.
    pub fn for_slot(&self, slot: &Slot) -> String {
        // A trial of several GPUs runs on the first of them (its process's cuda:0).
        let device = slot.parts.first().map_or(slot.device.as_str(), |p| p.device.as_str());
        let mut json = serde_json::json!({
            "ablate_version": self.ablate_version,
            "git_commit": self.git_commit,
            "libtorch_version": self.libtorch_version,
            "cuda_version": self.cuda_version,
            "device": device,
            "device_name": self.device_names.get(device).cloned().unwrap_or_else(|| "unknown".into()),
            "host": self.host,
        });
        if let Some(visible) = &slot.visible_devices {
            json["gpus"] = slot.name.as_str().into();
            json["cuda_visible_devices"] = visible.as_str().into();
        }
        json.to_string()
    }
}

/// The version of the libtorch this process loaded, and the CUDA it was built
/// for: from `version.py` beside a PyPI torch's `lib/`, or `build-version` beside
/// a libtorch archive's.
fn libtorch_versions() -> (String, String) {
    let unknown = || ("unknown".to_string(), "unknown".to_string());
    let Ok(maps) = std::fs::read_to_string("/proc/self/maps") else {
        return unknown();
    };
    let Some(lib) = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(std::path::PathBuf::from)
    else {
        return unknown();
    };
    let Some(root) = lib.parent().and_then(|d| d.parent()) else {
        return unknown();
    };
    if let Ok(text) = std::fs::read_to_string(root.join("version.py")) {
        let field = |name: &str| {
            text.lines()
                .find_map(|l| {
                    // `cuda: Optional[str] = '13.0'` or `__version__ = '2.11.0'`.
                    let (k, v) = l.split_once('=')?;
                    let k = k.split(':').next().unwrap_or(k).trim();
                    (k == name).then(|| v.trim().trim_matches(['\'', '"']).to_string())
                })
                .filter(|v| v != "None")
        };
        return (
            field("__version__").unwrap_or_else(|| "unknown".into()),
            field("cuda").unwrap_or_else(|| "none".into()),
        );
    }
    match std::fs::read_to_string(root.join("build-version")) {
        Ok(v) => {
            let v = v.trim().to_string();
            let cuda = v.split_once("+cu").map_or("none".to_string(), |(_, c)| c.to_string());
            (v, cuda)
        }
        Err(_) => unknown(),
    }
}

/// `cpu`: the CPU model; `cuda:N`: the GPU's name from nvidia-smi.
fn device_name(device: &str) -> String {
    if let Some(index) = device.strip_prefix("cuda:") {
        let out = std::process::Command::new("nvidia-smi")
            .args(["--query-gpu=name", "--format=csv,noheader", "-i", index])
            .output();
        return match out {
            Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout).trim().to_string(),
            _ => "unknown GPU".into(),
        };
    }
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}
