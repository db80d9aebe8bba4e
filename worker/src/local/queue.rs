//! The trials of a local sweep, by the queue's rules (`ablate_experiments::queue`,
//! the model the coordinator's lease statements follow): each slot's thread leases
//! one group at a time, a trial that waits for a failed one fails without running,
//! and a tpe searcher's proposals join as trials end.

use std::sync::{Condvar, Mutex};

use ablate_experiments::queue::{self, Queued};
use ablate_experiments::tpe::{self, Observation};
use ablate_schema::ParamDomain;
use ablate_schema::TrialState;
use serde_json::Value;

/// The tpe searcher's state in a local sweep: as the coordinator's, the sweep
/// holds `n_startup` random trials at first, then as many unfinished as it has
/// `slots`, up to `budget`, each proposed from the finished ones with the
/// unfinished ones as constant liars.
pub(super) struct Tpe {
    pub domains: Vec<(String, ParamDomain)>,
    pub budget: ablate_schema::Tpe,
    pub maximize: bool,
    /// The sweep's slots: how many trials it keeps in flight.
    pub slots: usize,
    /// The ordinals of the trials it holds, in order, and each one's observation at the
    /// same place (in flight until it ends): the history the estimator reads, in the
    /// coordinator's order.
    pub ordinals: Vec<usize>,
    pub history: Vec<Observation>,
}

/// A trial for the queue: its parameters, what it waits for and its fusion key
/// with the most members a group it leads may hold.
pub(super) struct Waiting {
    pub params: Value,
    pub queued: Queued,
    /// A proposal the family refused: it fails at once, with this reason.
    pub refused: Option<String>,
}

/// What a slot's thread does next.
pub(super) enum Next {
    /// One trial, or a fused group (in order), and whether they fuse (a trial
    /// that fuses may run as a group of one).
    Run(Vec<(usize, Value)>, bool),
    /// A trial it waits for failed, or its proposal was refused: it fails
    /// without running, with the reason.
    Failed(usize, Value, String),
    /// Nothing is left to start.
    Done,
}

/// The sweep's trials under the queue's rules; a thread leases the next group or
/// waits for a trial to end (which may make others ready or bring proposals).
pub(super) struct Queue {
    state: Mutex<QueueState>,
    ended_one: Condvar,
}

struct QueueState {
    rules: queue::Queue,
    params: Vec<Value>,
    /// Whether each trial was handed out (to run, or as failed without running).
    handed: Vec<bool>,
    /// Trials that ended.
    ended: usize,
    searcher: Option<Tpe>,
}

impl QueueState {
    fn push(&mut self, w: Waiting) {
        let ordinal = self.rules.push(w.queued);
        self.params.push(w.params);
        self.handed.push(false);
        if let Some(why) = w.refused {
            self.rules
                .fail(ordinal, format!("the searcher's proposal was refused: {why}"));
        }
    }

    /// Whether a trial handed out and not ended yet may add trials when it ends.
    fn may_grow(&self) -> bool {
        self.handed.iter().filter(|&&h| h).count() > self.ended
            && self
                .searcher
                .as_ref()
                .is_some_and(|s| self.rules.len() < s.budget.trials as usize)
    }
}

impl Queue {
    pub fn new(waiting: Vec<Waiting>, searcher: Option<Tpe>) -> Queue {
        // A local sweep runs each trial once: a trial's error fails it.
        let mut state = QueueState {
            rules: queue::Queue::new(1),
            params: Vec::new(),
            handed: Vec::new(),
            ended: 0,
            searcher,
        };
        for w in waiting {
            state.push(w);
        }
        Queue {
            state: Mutex::new(state),
            ended_one: Condvar::new(),
        }
    }

    /// Trials the sweep holds so far.
    pub fn total(&self) -> usize {
        self.state.lock().expect("queue lock").rules.len()
    }

    pub fn next(&self) -> Next {
        let mut state = self.state.lock().expect("queue lock");
        loop {
            let unhanded_failure =
                (0..state.rules.len()).find(|&i| !state.handed[i] && state.rules.state(i) == TrialState::Failed);
            if let Some(i) = unhanded_failure {
                state.handed[i] = true;
                let why = match (state.rules.waited_for(i), state.rules.error(i)) {
                    (Some(d), _) => format!("it waits for trial {d}, which failed"),
                    (None, Some(why)) => why.to_string(),
                    (None, None) => "it failed before it ran".to_string(),
                };
                return Next::Failed(i, state.params[i].clone(), why);
            }
            if let Some(group) = state.rules.lease(1).pop() {
                // A trial that fuses takes the fused code alone too.
                let fuses = state.rules.group(group[0]).is_some();
                let members = group
                    .into_iter()
                    .map(|i| {
                        state.handed[i] = true;
                        (i, state.params[i].clone())
                    })
                    .collect();
                return Next::Run(members, fuses);
            }
            let pending = (0..state.rules.len()).any(|i| state.rules.state(i) == TrialState::Pending);
            if !pending && !state.may_grow() {
                return Next::Done;
            }
            // A pending trial waits for a running one, or a searcher's next proposals
            // come when a running trial ends.
            state = self.ended_one.wait(state).expect("queue lock");
        }
    }

    /// A trial ended: with a searcher, its swept values and objective join the
    /// history and the trials it is owed are proposed (`propose` makes each).
    pub fn end(
        &self,
        ordinal: usize,
        succeeded: bool,
        swept: serde_json::Map<String, Value>,
        objective: Option<f64>,
        propose: impl Fn(serde_json::Map<String, Value>) -> Waiting,
    ) {
        let mut state = self.state.lock().expect("queue lock");
        state.rules.complete(ordinal, succeeded);
        state.ended += 1;
        let (finished, total) = (state.ended, state.rules.len());
        let mut proposals = Vec::new();
        if let Some(tpe) = state.searcher.as_mut() {
            let ended = Observation::new(swept, objective, tpe.maximize);
            let at = tpe.ordinals.partition_point(|&o| o < ordinal);
            if tpe.ordinals.get(at) == Some(&ordinal) {
                tpe.history[at] = ended;
            } else {
                tpe.ordinals.insert(at, ordinal);
                tpe.history.insert(at, ended);
            }
            let owed = tpe.budget.owed(finished as u64, total as u64, Some(tpe.slots as u64)) as usize;
            let seed = tpe.budget.seed.unwrap_or(0);
            for ordinal in total..total + owed {
                let point = tpe::propose_after_start(
                    &tpe.domains,
                    &tpe.history,
                    seed,
                    ordinal,
                    tpe.budget.multivariate(),
                    tpe.budget.n_startup() as usize,
                );
                tpe.ordinals.push(ordinal);
                tpe.history.push(Observation::in_flight(point.clone()));
                proposals.push(propose(point));
            }
        }
        for w in proposals {
            state.push(w);
        }
        drop(state);
        self.ended_one.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiting(ordinal: usize, depends_on: Vec<usize>, group: Option<(&str, usize)>) -> Waiting {
        Waiting {
            params: serde_json::json!({ "n": ordinal }),
            queued: Queued {
                depends_on,
                group: group.map(|(k, n)| (k.to_string(), n)),
            },
            refused: None,
        }
    }

    fn end(queue: &Queue, ordinal: usize, succeeded: bool) {
        queue.end(ordinal, succeeded, Default::default(), None, |_| {
            unreachable!("no searcher")
        });
    }

    /// The trials a slot takes next, and whether they fuse.
    fn ordinals(next: Next) -> (Vec<usize>, bool) {
        match next {
            Next::Run(members, fuses) => (members.into_iter().map(|m| m.0).collect(), fuses),
            Next::Failed(..) => panic!("a trial failed"),
            Next::Done => (vec![], false),
        }
    }

    #[test]
    fn the_queue_groups_ready_trials_of_one_key_up_to_the_group_size() {
        let queue = Queue::new(
            vec![
                waiting(0, vec![], Some(("a", 3))),
                waiting(1, vec![], Some(("b", 3))),
                waiting(2, vec![], Some(("a", 3))),
                waiting(3, vec![0], Some(("a", 3))),
                waiting(4, vec![], Some(("a", 3))),
                waiting(5, vec![], Some(("a", 3))),
                waiting(6, vec![], None),
            ],
            None,
        );
        // Trial 3 waits for 0, so the first group skips it; at most three members.
        assert_eq!(ordinals(queue.next()), (vec![0, 2, 4], true));
        // Alone, but it fuses: a group of one.
        assert_eq!(ordinals(queue.next()), (vec![1], true));
        for ordinal in [0, 2, 4, 1] {
            end(&queue, ordinal, true);
        }
        assert_eq!(ordinals(queue.next()), (vec![3, 5], true));
        assert_eq!(ordinals(queue.next()), (vec![6], false));
        assert!(matches!(queue.next(), Next::Done));
    }

    #[test]
    fn a_trial_that_waits_for_a_failed_one_fails_without_running_and_so_do_its_own() {
        let queue = Queue::new(
            vec![
                waiting(0, vec![], None),
                waiting(1, vec![0], None),
                waiting(2, vec![1], None),
            ],
            None,
        );
        assert_eq!(ordinals(queue.next()), (vec![0], false));
        end(&queue, 0, false);
        for (ordinal, dep) in [(1, 0), (2, 1)] {
            match queue.next() {
                Next::Failed(i, _, why) => {
                    assert_eq!((i, why), (ordinal, format!("it waits for trial {dep}, which failed")));
                    end(&queue, i, false);
                }
                _ => panic!("trial {ordinal} should fail without running"),
            }
        }
        assert!(matches!(queue.next(), Next::Done));
    }

    #[test]
    fn the_queue_adds_a_tpe_proposal_for_each_trial_that_ends_up_to_the_budget() {
        let searcher = Tpe {
            domains: vec![(
                "x".into(),
                ParamDomain::Range {
                    lo: 0.0,
                    hi: 10.0,
                    step: 1.0,
                },
            )],
            budget: ablate_schema::Tpe {
                trials: 4,
                n_startup: Some(2),
                seed: None,
                multivariate: None,
            },
            maximize: false,
            // Two trials run at once: the sweep keeps two in flight.
            slots: 2,
            ordinals: vec![],
            history: vec![],
        };
        let queue = Queue::new(vec![waiting(0, vec![], None), waiting(1, vec![], None)], Some(searcher));
        let made = |point: serde_json::Map<String, Value>| Waiting {
            params: Value::Object(point),
            ..waiting(0, vec![], None)
        };
        assert_eq!(ordinals(queue.next()), (vec![0], false));
        assert_eq!(ordinals(queue.next()), (vec![1], false));
        // Both run; a third thread waits for a proposal instead of ending.
        queue.end(0, true, Default::default(), Some(1.0), made);
        assert_eq!(queue.total(), 3);
        assert_eq!(ordinals(queue.next()), (vec![2], false));
        queue.end(1, false, Default::default(), None, made);
        queue.end(2, true, Default::default(), Some(0.5), made);
        assert_eq!(queue.total(), 4);
        assert_eq!(ordinals(queue.next()), (vec![3], false));
        queue.end(3, true, Default::default(), Some(0.2), made);
        assert_eq!(queue.total(), 4, "the budget is spent");
        assert!(matches!(queue.next(), Next::Done));
    }
}
