//! Which probe targets are alive, and which member of a group to use.
//!
//! Pure: no sockets, no clock. The prober feeds it "probe sent" and
//! "answer received" events with their time; the run loop asks it for
//! health ([`Liveness::health`]) and for a group's active member
//! ([`Liveness::choose`]).
//!
//! Rules:
//! - a probe is *missed* when the next one is due and it has no answer;
//!   `misses` consecutive misses make a target DOWN;
//! - one answer makes it UP again, but it is *stable* only once it has
//!   been up without interruption for `hold_down`, and only a stable
//!   member takes traffic back from a later one (no flapping);
//! - a target starts UP (presumed, not stable): an agent restart must not
//!   move traffic away from a connector that is fine, and a dead one is
//!   found out after `misses` probes like any other.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

/// How strict liveness is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LivenessConfig {
    /// Consecutive unanswered probes that make a target DOWN (at least 1).
    pub misses: u32,
    /// How long a target must stay UP before it takes traffic back.
    pub hold_down: Duration,
}

impl Default for LivenessConfig {
    fn default() -> Self {
        LivenessConfig {
            misses: 3,
            hold_down: Duration::from_secs(10),
        }
    }
}

/// What is known about one target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHealth {
    pub up: bool,
    /// Up for at least the hold-down, without interruption.
    pub stable: bool,
    /// Since when it has been in its current state (up or down).
    pub since: Instant,
    /// Consecutive unanswered probes.
    pub misses: u32,
    pub sent: u64,
    pub answered: u64,
    /// Probes that got no answer before the next one was due (ever).
    pub missed: u64,
    pub last_rtt: Option<Duration>,
    pub last_answer: Option<Instant>,
}

/// A target that went UP or DOWN.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    pub target: String,
    pub up: bool,
}

#[derive(Debug, Clone)]
struct Target {
    up: bool,
    since: Instant,
    /// The last probe sent has no answer yet.
    awaiting: bool,
    misses: u32,
    sent: u64,
    answered: u64,
    missed: u64,
    last_rtt: Option<Duration>,
    last_answer: Option<Instant>,
}

impl Target {
    fn new(now: Instant) -> Self {
        Target {
            up: true,
            since: now,
            awaiting: false,
            misses: 0,
            sent: 0,
            answered: 0,
            missed: 0,
            last_rtt: None,
            last_answer: None,
        }
    }

    fn stable(&self, hold_down: Duration, now: Instant) -> bool {
        self.up && now.saturating_duration_since(self.since) >= hold_down
    }
}

/// The liveness of every probe target (see the module docs).
#[derive(Debug, Clone)]
pub struct Liveness {
    config: LivenessConfig,
    targets: BTreeMap<String, Target>,
    /// The time of the latest event, for [`Liveness::choose`].
    now: Instant,
}

impl Liveness {
    pub fn new(config: LivenessConfig, now: Instant) -> Self {
        Liveness {
            config: LivenessConfig {
                misses: config.misses.max(1),
                ..config
            },
            targets: BTreeMap::new(),
            now,
        }
    }

    pub fn config(&self) -> LivenessConfig {
        self.config
    }

    /// Probe exactly `names` from now on: new ones start UP (presumed),
    /// known ones keep their history, the others are forgotten.
    pub fn set_targets<'a>(&mut self, names: impl IntoIterator<Item = &'a str>, now: Instant) {
        self.advance(now);
        let mut kept = BTreeMap::new();
        for name in names {
            let target = self
                .targets
                .remove(name)
                .unwrap_or_else(|| Target::new(now));
            kept.insert(name.to_owned(), target);
        }
        self.targets = kept;
    }

    /// A probe to `target` leaves at `now`. If the previous one is still
    /// unanswered it counts as missed, which may make the target DOWN.
    pub fn sent(&mut self, target: &str, now: Instant) -> Option<Transition> {
        self.advance(now);
        let misses = self.config.misses;
        let state = self.targets.get_mut(target)?;
        let mut went_down = false;
        if state.awaiting {
            state.missed += 1;
            state.misses = state.misses.saturating_add(1);
            if state.up && state.misses >= misses {
                state.up = false;
                state.since = now;
                went_down = true;
            }
        }
        state.awaiting = true;
        state.sent += 1;
        went_down.then(|| Transition {
            target: target.to_owned(),
            up: false,
        })
    }

    /// `target` answered a probe after `rtt`. Any genuine answer, even a
    /// late one, proves the target alive.
    pub fn answered(&mut self, target: &str, rtt: Duration, now: Instant) -> Option<Transition> {
        self.advance(now);
        let state = self.targets.get_mut(target)?;
        state.awaiting = false;
        state.misses = 0;
        state.answered += 1;
        state.last_rtt = Some(rtt);
        state.last_answer = Some(now);
        if state.up {
            return None;
        }
        state.up = true;
        state.since = now;
        Some(Transition {
            target: target.to_owned(),
            up: true,
        })
    }

    /// Health of `target` at `now`; `None` if it is not probed.
    pub fn health(&self, target: &str, now: Instant) -> Option<TargetHealth> {
        let state = self.targets.get(target)?;
        Some(TargetHealth {
            up: state.up,
            stable: state.stable(self.config.hold_down, now),
            since: state.since,
            misses: state.misses,
            sent: state.sent,
            answered: state.answered,
            missed: state.missed,
            last_rtt: state.last_rtt,
            last_answer: state.last_answer,
        })
    }

    /// Health of every target at `now`.
    pub fn all(&self, now: Instant) -> BTreeMap<String, TargetHealth> {
        self.targets
            .keys()
            .filter_map(|name| Some((name.clone(), self.health(name, now)?)))
            .collect()
    }

    pub fn is_up(&self, target: &str) -> bool {
        self.targets.get(target).is_some_and(|t| t.up)
    }

    pub fn is_stable(&self, target: &str, now: Instant) -> bool {
        self.targets
            .get(target)
            .is_some_and(|t| t.stable(self.config.hold_down, now))
    }

    /// [`Liveness::choose_at`] at the time of the latest event fed in
    /// (probes go out every interval, so it is at most that old).
    pub fn choose(&self, order: &[String], current: Option<&str>) -> Option<String> {
        self.choose_at(order, current, self.now)
    }

    /// The member of a group (`order`: preferred first) that should carry
    /// traffic at `now`, given the one that does (`current`):
    /// - `current` while it is up, unless a member before it in `order`
    ///   is stable (up for the hold-down): then the first such member;
    /// - if `current` is down, not a member, or `None`: the first member
    ///   that is up;
    /// - if no member is up: `current` if it is a member, else the first
    ///   member. A dead group carries nothing either way, and keeping the
    ///   last choice means traffic flows the moment that member answers
    ///   again, with no map write and no churn during a total outage
    ///   (the first member when there is no valid current one, so the
    ///   group never points outside itself).
    ///
    /// Names that are not probe targets count as down. `None` only for an
    /// empty `order`.
    pub fn choose_at(
        &self,
        order: &[String],
        current: Option<&str>,
        now: Instant,
    ) -> Option<String> {
        let position = current.and_then(|c| order.iter().position(|m| m == c));
        if let Some(at) = position
            && self.is_up(&order[at])
        {
            let earlier_stable = order[..at].iter().find(|m| self.is_stable(m, now));
            return Some(earlier_stable.unwrap_or(&order[at]).clone());
        }
        if let Some(up) = order.iter().find(|m| self.is_up(m)) {
            return Some(up.clone());
        }
        position
            .or(if order.is_empty() { None } else { Some(0) })
            .map(|at| order[at].clone())
    }

    fn advance(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const INTERVAL: Duration = Duration::from_millis(100);
    const HOLD_DOWN: Duration = Duration::from_secs(2);

    fn config() -> LivenessConfig {
        LivenessConfig {
            misses: 3,
            hold_down: HOLD_DOWN,
        }
    }

    /// A liveness of targets `a`, `b`, `c` with a clock the tests move.
    struct Clock {
        liveness: Liveness,
        now: Instant,
    }

    impl Clock {
        fn new() -> Self {
            let now = Instant::now();
            let mut liveness = Liveness::new(config(), now);
            liveness.set_targets(["a", "b", "c"], now);
            Clock { liveness, now }
        }

        /// One probe round: every target is probed, those in `answering`
        /// answer within it. Returns the transitions.
        fn round(&mut self, answering: &[&str]) -> Vec<Transition> {
            let mut out = Vec::new();
            for name in ["a", "b", "c"] {
                out.extend(self.liveness.sent(name, self.now));
            }
            for name in answering {
                out.extend(self.liveness.answered(
                    name,
                    Duration::from_millis(1),
                    self.now + Duration::from_millis(1),
                ));
            }
            self.now += INTERVAL;
            out
        }

        fn rounds(&mut self, count: usize, answering: &[&str]) -> Vec<Transition> {
            (0..count).flat_map(|_| self.round(answering)).collect()
        }

        fn choose(&self, current: Option<&str>) -> Option<String> {
            self.liveness.choose_at(&order(), current, self.now)
        }
    }

    fn order() -> Vec<String> {
        ["a", "b", "c"].map(String::from).to_vec()
    }

    fn down(target: &str) -> Transition {
        Transition {
            target: target.into(),
            up: false,
        }
    }

    fn up(target: &str) -> Transition {
        Transition {
            target: target.into(),
            up: true,
        }
    }

    #[test]
    fn new_targets_are_presumed_up_but_not_stable() {
        let clock = Clock::new();
        let health = clock.liveness.health("a", clock.now).unwrap();
        assert!(health.up && !health.stable);
        assert_eq!((health.sent, health.answered), (0, 0));
        assert!(clock.liveness.health("nobody", clock.now).is_none());
        // Presumed up: a restarted agent keeps using its connector.
        assert_eq!(
            clock.liveness.choose(&order(), Some("b")).as_deref(),
            Some("b")
        );
        assert_eq!(clock.liveness.choose(&order(), None).as_deref(), Some("a"));
    }

    #[test]
    fn down_after_the_configured_consecutive_misses() {
        let mut clock = Clock::new();
        assert!(clock.rounds(5, &["a", "b", "c"]).is_empty());
        // `a` stops answering: its probe is missed when the next is due.
        assert!(clock.rounds(3, &["b", "c"]).is_empty(), "2 misses only");
        assert_eq!(clock.liveness.health("a", clock.now).unwrap().misses, 2);
        assert_eq!(clock.round(&["b", "c"]), [down("a")]);
        let health = clock.liveness.health("a", clock.now).unwrap();
        assert!(!health.up && !health.stable);
        assert_eq!((health.sent, health.answered, health.missed), (9, 5, 3));
        // Further misses report nothing new.
        assert!(clock.rounds(3, &["b", "c"]).is_empty());
    }

    #[test]
    fn an_answer_resets_the_miss_count() {
        let mut clock = Clock::new();
        for _ in 0..5 {
            clock.rounds(2, &["b", "c"]);
            assert!(clock.round(&["a", "b", "c"]).is_empty());
        }
        assert!(clock.liveness.is_up("a"));
    }

    #[test]
    fn one_answer_brings_a_target_back_up_and_hold_down_makes_it_stable() {
        let mut clock = Clock::new();
        clock.rounds(4, &["b", "c"]);
        assert!(!clock.liveness.is_up("a"));
        assert_eq!(clock.round(&["a", "b", "c"]), [up("a")]);
        let health = clock.liveness.health("a", clock.now).unwrap();
        assert!(health.up && !health.stable);
        assert_eq!(health.last_rtt, Some(Duration::from_millis(1)));
        // It answered 1 ms into its round; 2 s later it is stable.
        clock.rounds(19, &["a", "b", "c"]);
        assert!(!clock.liveness.is_stable("a", clock.now));
        assert!(clock.liveness.is_stable("a", health.since + HOLD_DOWN));
        clock.round(&["a", "b", "c"]);
        assert!(clock.liveness.is_stable("a", clock.now));
    }

    #[test]
    fn choose_keeps_the_current_member_while_it_is_up() {
        let mut clock = Clock::new();
        // `a` and `b` were down and just answered again: up, not stable.
        clock.rounds(4, &["c"]);
        clock.round(&["a", "b", "c"]);
        assert!(clock.liveness.is_up("a") && !clock.liveness.is_stable("a", clock.now));
        assert_eq!(clock.choose(Some("c")).as_deref(), Some("c"));
        assert_eq!(clock.choose(Some("b")).as_deref(), Some("b"));
        // Later members being stable never moves traffic forward.
        clock.rounds(30, &["a", "b", "c"]);
        assert_eq!(clock.choose(Some("a")).as_deref(), Some("a"));
        // An earlier member that is stable takes it back.
        assert_eq!(clock.choose(Some("c")).as_deref(), Some("a"));
    }

    #[test]
    fn choose_fails_over_to_the_first_up_member_in_order() {
        let mut clock = Clock::new();
        clock.rounds(30, &["a", "b", "c"]);
        clock.rounds(4, &["c"]);
        assert!(!clock.liveness.is_up("a") && !clock.liveness.is_up("b"));
        assert_eq!(clock.choose(Some("a")).as_deref(), Some("c"));
        // A member that is not in the order counts as down.
        assert_eq!(clock.choose(Some("gone")).as_deref(), Some("c"));
    }

    #[test]
    fn a_failover_target_need_not_be_stable() {
        let mut clock = Clock::new();
        clock.rounds(4, &["a"]);
        // b came back just now, a dies: b is the first up member.
        clock.round(&["a", "b"]);
        clock.rounds(4, &["b"]);
        assert!(!clock.liveness.is_stable("b", clock.now));
        assert_eq!(clock.choose(Some("a")).as_deref(), Some("b"));
    }

    #[test]
    fn a_returning_member_takes_traffic_back_only_after_hold_down() {
        let mut clock = Clock::new();
        clock.rounds(30, &["a", "b", "c"]);
        clock.rounds(4, &["b", "c"]);
        let current = clock.choose(Some("a"));
        assert_eq!(current.as_deref(), Some("b"));
        // `a` answers again: up, but b keeps the traffic until hold-down.
        assert_eq!(clock.round(&["a", "b", "c"]), [up("a")]);
        let back_at = clock.liveness.health("a", clock.now).unwrap().since;
        while clock.now < back_at + HOLD_DOWN {
            assert_eq!(clock.choose(current.as_deref()), current, "too early");
            clock.round(&["a", "b", "c"]);
        }
        assert_eq!(clock.choose(current.as_deref()).as_deref(), Some("a"));
    }

    #[test]
    fn a_flapping_member_never_takes_traffic_back() {
        let mut clock = Clock::new();
        clock.rounds(30, &["a", "b", "c"]);
        let mut current = Some("a".to_owned());
        for _ in 0..10 {
            // Down for 4 rounds, then one answer, then silent again.
            clock.rounds(4, &["b", "c"]);
            current = clock.choose(current.as_deref());
            assert_eq!(current.as_deref(), Some("b"));
            assert_eq!(clock.round(&["a", "b", "c"]), [up("a")]);
            current = clock.choose(current.as_deref());
            assert_eq!(current.as_deref(), Some("b"), "a answered once, not stable");
        }
    }

    #[test]
    fn all_down_keeps_the_current_member() {
        let mut clock = Clock::new();
        clock.rounds(4, &[]);
        assert!(!["a", "b", "c"].iter().any(|m| clock.liveness.is_up(m)));
        assert_eq!(clock.choose(Some("b")).as_deref(), Some("b"));
        // Without a valid current member: the first one.
        assert_eq!(clock.choose(None).as_deref(), Some("a"));
        assert_eq!(clock.choose(Some("gone")).as_deref(), Some("a"));
        assert_eq!(clock.liveness.choose(&[], Some("a")), None);
        // The kept member answering again carries traffic at once.
        clock.round(&["b"]);
        assert_eq!(clock.choose(Some("b")).as_deref(), Some("b"));
    }

    #[test]
    fn set_targets_keeps_history_and_forgets_removed() {
        let mut clock = Clock::new();
        clock.rounds(4, &["b", "c"]);
        clock.liveness.set_targets(["a", "b", "d"], clock.now);
        assert!(!clock.liveness.is_up("a"), "a keeps its DOWN state");
        assert!(clock.liveness.health("c", clock.now).is_none());
        assert!(clock.liveness.is_up("d"));
        assert_eq!(clock.liveness.sent("c", clock.now), None);
        assert_eq!(
            clock.liveness.all(clock.now).keys().collect::<Vec<_>>(),
            ["a", "b", "d"]
        );
    }

    #[test]
    fn a_single_miss_threshold_works() {
        let now = Instant::now();
        let mut liveness = Liveness::new(
            LivenessConfig {
                misses: 0,
                hold_down: Duration::ZERO,
            },
            now,
        );
        liveness.set_targets(["a"], now);
        assert_eq!(liveness.sent("a", now), None);
        // 0 is taken as 1: the first missed probe is enough.
        assert_eq!(liveness.sent("a", now + INTERVAL), Some(down("a")));
        assert_eq!(
            liveness.answered("a", INTERVAL, now + INTERVAL * 2),
            Some(up("a"))
        );
        assert!(liveness.is_stable("a", now + INTERVAL * 2));
    }
}
