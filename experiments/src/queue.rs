//! The queue's rules, once: which trials a lease takes, what waits for what, how
//! trials fuse, what a crash or an expired lease does, and what cancelling does.
//! `ablate-worker sweep` runs its trials by this model; the coordinator's lease
//! (coordinator/src/platform/lease.rs over the statements of db/queue.rs) and its
//! completions are its SQL form, and a property
//! test (coordinator/tests/queue_model.rs) drives both through random sequences
//! of lease, complete, crash, expire and cancel and compares the states they reach.
//!
//! The rules:
//! - A trial is ready when it is pending and every trial it depends on succeeded.
//! - A lease of `slots` takes the first `slots` ready trials in order. Each joins
//!   the first group of this lease with its fusion key that has room (the first
//!   member's group size), or leads a group of its own; then each group that fuses
//!   takes the next ready trials of its key, in order, up to its size.
//! - A trial that ends failed fails every pending trial that waits for it, and
//!   theirs in turn; each names the first failed trial it waits for
//!   ([`Queue::waited_for`]; the coordinator's trigger `fail_dependents` writes it
//!   into the reason).
//! - A crash or an expired lease requeues the trial while it has had fewer than
//!   `max_attempts` attempts, else fails it.
//! - Cancelling makes every pending and running trial cancelled.
//!
//! States are the coordinator's own (`TrialState`); the rules never prune.

use ablate_schema::TrialState;

/// A trial as the queue sees it: the earlier trials it waits for, and the fusion
/// key it may fuse under with the most members a group it leads may hold.
#[derive(Debug, Clone, Default)]
pub struct Queued {
    pub depends_on: Vec<usize>,
    pub group: Option<(String, usize)>,
}

#[derive(Debug, Clone)]
struct Entry {
    trial: Queued,
    state: TrialState,
    attempts: u32,
    error: Option<String>,
    /// The failed trial it waited for, when it failed for that.
    waited_for: Option<usize>,
}

/// An experiment's trials, by ordinal (their order), and the rules above.
#[derive(Debug, Clone)]
pub struct Queue {
    entries: Vec<Entry>,
    max_attempts: u32,
}

impl Queue {
    pub fn new(max_attempts: u32) -> Queue {
        Queue {
            entries: Vec::new(),
            max_attempts: max_attempts.max(1),
        }
    }

    /// Adds a pending trial; returns its ordinal. A trial it waits for that
    /// already failed fails it at once.
    pub fn push(&mut self, trial: Queued) -> usize {
        let ordinal = self.entries.len();
        assert!(
            trial.depends_on.iter().all(|&d| d < ordinal),
            "a trial waits only for earlier trials"
        );
        // Only the new trial can wait for one that already failed.
        let waited_for = self.failed_among(&trial.depends_on);
        self.entries.push(Entry {
            trial,
            state: if waited_for.is_some() {
                TrialState::Failed
            } else {
                TrialState::Pending
            },
            attempts: 0,
            error: None,
            waited_for,
        });
        ordinal
    }

    /// Trials it holds: pending, running and ended.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn state(&self, ordinal: usize) -> TrialState {
        self.entries[ordinal].state
    }

    /// Attempts the trial started.
    pub fn attempts(&self, ordinal: usize) -> u32 {
        self.entries[ordinal].attempts
    }

    /// The fusion key it fuses under and the most members a group it leads may hold.
    pub fn group(&self, ordinal: usize) -> Option<&(String, usize)> {
        self.entries[ordinal].trial.group.as_ref()
    }

    /// Why it failed, when it failed before it ran ([`Queue::fail`]).
    pub fn error(&self, ordinal: usize) -> Option<&str> {
        self.entries[ordinal].error.as_deref()
    }

    /// The failed trial it waited for, when it failed for that.
    pub fn waited_for(&self, ordinal: usize) -> Option<usize> {
        self.entries[ordinal].waited_for
    }

    /// Whether no trial is pending or running.
    pub fn finished(&self) -> bool {
        self.entries
            .iter()
            .all(|e| !matches!(e.state, TrialState::Pending | TrialState::Running))
    }

    /// Whether a trial is running (so a trial may yet become ready, or a searcher propose more).
    pub fn any_running(&self) -> bool {
        self.entries.iter().any(|e| e.state == TrialState::Running)
    }

    fn ready(&self, ordinal: usize) -> bool {
        let e = &self.entries[ordinal];
        e.state == TrialState::Pending
            && e.trial
                .depends_on
                .iter()
                .all(|&d| self.entries[d].state == TrialState::Succeeded)
    }

    /// Leases up to `slots` ready trials as heads and fuses them into groups (see the
    /// rules); each group's ordinals, its head first, the groups in their heads' order.
    pub fn lease(&mut self, slots: usize) -> Vec<Vec<usize>> {
        let ready: Vec<usize> = (0..self.entries.len()).filter(|&i| self.ready(i)).collect();
        let key = |i: usize| self.entries[i].trial.group.as_ref();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        for &head in ready.iter().take(slots) {
            let room = groups.iter_mut().find(|g| match (key(g[0]), key(head)) {
                (Some((k, size)), Some((mine, _))) => k == mine && g.len() < *size,
                _ => false,
            });
            match room {
                Some(group) => group.push(head),
                None => groups.push(vec![head]),
            }
        }
        let heads = ready.len().min(slots);
        let mut rest: Vec<usize> = ready[heads..].to_vec();
        for group in &mut groups {
            let Some((k, size)) = key(group[0]) else {
                continue;
            };
            while group.len() < *size {
                let Some(at) = rest.iter().position(|&j| key(j).is_some_and(|(mine, _)| mine == k)) else {
                    break;
                };
                group.push(rest.remove(at));
            }
        }
        for &i in groups.iter().flatten() {
            let e = &mut self.entries[i];
            e.state = TrialState::Running;
            e.attempts += 1;
        }
        groups
    }

    /// A running trial ended with its own result.
    pub fn complete(&mut self, ordinal: usize, succeeded: bool) {
        let e = &mut self.entries[ordinal];
        if e.state != TrialState::Running {
            return;
        }
        e.state = if succeeded {
            TrialState::Succeeded
        } else {
            TrialState::Failed
        };
        self.fail_dependents();
    }

    /// A running trial failed before it ran (a searcher's proposal its family refused, ...).
    pub fn fail(&mut self, ordinal: usize, error: String) {
        let e = &mut self.entries[ordinal];
        if matches!(e.state, TrialState::Pending | TrialState::Running) {
            e.state = TrialState::Failed;
            e.error = Some(error);
            self.fail_dependents();
        }
    }

    /// A running trial's process crashed: requeued or failed.
    pub fn crash(&mut self, ordinal: usize) {
        self.requeue_or_fail(ordinal);
    }

    /// A running trial's lease expired: requeued or failed, as a crash.
    pub fn expire(&mut self, ordinal: usize) {
        self.requeue_or_fail(ordinal);
    }

    fn requeue_or_fail(&mut self, ordinal: usize) {
        let max = self.max_attempts;
        let e = &mut self.entries[ordinal];
        if e.state != TrialState::Running {
            return;
        }
        if e.attempts >= max {
            e.state = TrialState::Failed;
            self.fail_dependents();
        } else {
            e.state = TrialState::Pending;
        }
    }

    /// Every pending and running trial becomes cancelled.
    pub fn cancel(&mut self) {
        for e in &mut self.entries {
            if matches!(e.state, TrialState::Pending | TrialState::Running) {
                e.state = TrialState::Cancelled;
            }
        }
    }

    /// The first of `trials` that failed.
    fn failed_among(&self, trials: &[usize]) -> Option<usize> {
        trials
            .iter()
            .copied()
            .filter(|&d| self.entries[d].state == TrialState::Failed)
            .min()
    }

    /// Fails, in order, each pending trial that waits for a failed one (a trial
    /// waits only for earlier ones, so one pass in order reaches every chain).
    fn fail_dependents(&mut self) {
        for i in 0..self.entries.len() {
            if self.entries[i].state != TrialState::Pending {
                continue;
            }
            if let Some(d) = self.failed_among(&self.entries[i].trial.depends_on) {
                let e = &mut self.entries[i];
                e.state = TrialState::Failed;
                e.waited_for = Some(d);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(depends_on: Vec<usize>, group: Option<(&str, usize)>) -> Queued {
        Queued {
            depends_on,
            group: group.map(|(k, n)| (k.to_string(), n)),
        }
    }

    #[test]
    fn a_lease_fuses_its_heads_of_one_key_and_fills_their_group_in_order() {
        let mut q = Queue::new(1);
        for t in [
            queued(vec![], Some(("a", 3))),
            queued(vec![], Some(("a", 3))),
            queued(vec![], None),
            queued(vec![], Some(("a", 3))),
            queued(vec![], Some(("a", 3))),
            queued(vec![], Some(("b", 2))),
        ] {
            q.push(t);
        }
        // Two slots: the first two ready trials share key a, one group, which takes a third.
        assert_eq!(q.lease(2), vec![vec![0, 1, 3]]);
        assert_eq!(q.lease(5), vec![vec![2], vec![4], vec![5]]);
        assert!(q.lease(1).is_empty());
        assert_eq!(q.attempts(3), 1);
    }

    #[test]
    fn a_failure_fails_the_trials_that_wait_for_it_and_theirs() {
        let mut q = Queue::new(2);
        q.push(queued(vec![], None));
        q.push(queued(vec![0], None));
        q.push(queued(vec![1], None));
        q.push(queued(vec![], None));
        assert_eq!(q.lease(4), vec![vec![0], vec![3]]);
        q.crash(0);
        assert_eq!(q.state(0), TrialState::Pending, "one attempt of two: requeued");
        assert_eq!(q.lease(1), vec![vec![0]]);
        q.expire(0);
        assert_eq!(q.state(0), TrialState::Failed, "its second attempt was its last");
        assert_eq!((q.state(1), q.state(2)), (TrialState::Failed, TrialState::Failed));
        assert_eq!((q.waited_for(1), q.waited_for(2)), (Some(0), Some(1)));
        assert!(!q.finished());
        q.complete(3, true);
        assert!(q.finished());
    }

    #[test]
    fn a_trial_waits_until_what_it_depends_on_succeeded_and_cancel_ends_everything() {
        let mut q = Queue::new(3);
        q.push(queued(vec![], None));
        q.push(queued(vec![0], None));
        q.push(queued(vec![], None));
        assert_eq!(q.lease(3), vec![vec![0], vec![2]]);
        q.complete(0, true);
        assert_eq!(q.lease(3), vec![vec![1]]);
        q.cancel();
        assert_eq!((q.state(1), q.state(2)), (TrialState::Cancelled, TrialState::Cancelled));
        assert_eq!(q.state(0), TrialState::Succeeded);
    }
}
