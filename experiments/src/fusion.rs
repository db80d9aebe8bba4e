//! Whether a trial fuses and with how many: the one decision the coordinator's
//! lease and `ablate-worker sweep` both take ([`group`]). A trial fuses when the
//! spec asks (`fuse`) and it has a fusion key (given at submission by its
//! family's `fuse_key`); its group holds the spec's `fuse`, or with `fuse =
//! "auto"` as many as fit the memory a worker's slot offers.

use ablate_schema::{Fuse, MAX_FUSE};
use serde_json::Value;

use crate::Family;

/// The group size `auto` uses when the slot's memory is unknown.
pub const AUTO_WITHOUT_MEMORY: u32 = 8;

/// The share of a slot's memory an `auto` group may fill.
const AUTO_SHARE: f64 = 0.5;

/// The group a trial leads: its fusion key and the most members it may hold (1: it
/// fuses alone, taking the fused code all the same).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Group {
    pub key: String,
    pub size: u32,
}

/// The group a trial with fusion key `key` and `params` leads under the spec's `fuse`
/// on a slot of `slot_memory` bytes (0: unknown); `None` when it does not fuse.
pub fn group(fuse: Option<Fuse>, key: Option<&str>, family: Family, params: &Value, slot_memory: u64) -> Option<Group> {
    let (fuse, key) = fuse.zip(key)?;
    Some(Group {
        key: key.to_string(),
        size: group_size(fuse, family, params, slot_memory),
    })
}

/// Whether a trial fuses at all: the spec asks to (`fuse`) and the trial has a key
/// (what [`group`] needs before it sizes the group).
pub fn fuses(fuse: Option<Fuse>, key: Option<&str>) -> bool {
    fuse.is_some() && key.is_some()
}

/// The most members a group led by a trial with `params` may hold on a slot of
/// `slot_memory` bytes (0: unknown); 1 when the trial can't fuse.
pub fn group_size(fuse: Fuse, family: Family, params: &Value, slot_memory: u64) -> u32 {
    let Ok(fusable) = family.fuse_key(params) else {
        return 1;
    };
    match fuse {
        Fuse::Members(n) => n,
        Fuse::Auto if slot_memory == 0 => AUTO_WITHOUT_MEMORY,
        Fuse::Auto => {
            let fit = (AUTO_SHARE * slot_memory as f64 / fusable.member_bytes.max(1) as f64).floor();
            (fit as u32).clamp(1, MAX_FUSE)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn auto_groups_grow_with_the_slots_memory_and_shrink_with_the_model() {
        let train = Family::parse("train").unwrap();
        let small = json!({"optimizer": "adam", "lr": 0.01, "steps": 10, "width": 32});
        let wide = json!({"optimizer": "adam", "lr": 0.01, "steps": 10, "width": 4096, "dataset": "mnist"});
        assert_eq!(group_size(Fuse::Members(8), train, &small, 0), 8);
        assert_eq!(group_size(Fuse::Auto, train, &small, 0), AUTO_WITHOUT_MEMORY);
        // 80 GiB holds the most members of a small MLP; a wide one fits fewer in 1 GiB.
        assert_eq!(group_size(Fuse::Auto, train, &small, 80 << 30), MAX_FUSE);
        let few = group_size(Fuse::Auto, train, &wide, 1 << 30);
        assert!((1..MAX_FUSE).contains(&few), "{few}");
        assert!(group_size(Fuse::Auto, train, &wide, 4 << 30) > few);
        // A trial that can't fuse runs alone whatever the spec says.
        let gpt = json!({"optimizer": "adam", "lr": 0.01, "steps": 10, "model": "gpt", "dataset": "shakespeare"});
        assert_eq!(group_size(Fuse::Members(8), train, &gpt, 0), 1);
        // Without fuse or a key, no group; with both, its key and size.
        assert_eq!(group(None, Some("k"), train, &small, 0), None);
        assert_eq!(group(Some(Fuse::Members(4)), None, train, &small, 0), None);
        let led = group(Some(Fuse::Members(4)), Some("k"), train, &small, 0);
        assert_eq!(
            led,
            Some(Group {
                key: "k".into(),
                size: 4
            })
        );
    }
}
