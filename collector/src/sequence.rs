//! Which of a VM's sequence numbers are stored, so that an acknowledged
//! event is always either stored, a duplicate of a stored one, or refused
//! with a reason; never silently dropped.
//!
//! A VM numbers its events 1, 2, 3, ... and resends, on a new stream, what
//! was not acknowledged. Most of the time what is stored is everything up to
//! the highest sequence committed. The exceptions are gaps: events the
//! sidecar dropped before sending (never filled), and events that will
//! still come, e.g. a batch whose commit failed while a later batch of the
//! same stream committed, or a hostile client that jumped ahead. Each VM
//! keeps its gaps below the highest sequence, at most [`MAX_GAPS`]: a
//! sequence inside a gap is new and closes it, one at or below the highest
//! and outside every gap is a duplicate. When more gaps open, the oldest is
//! forgotten and everything at or below its end (the *floor*) can no longer
//! be told apart: such a sequence is refused, not acknowledged as stored.

/// Most gaps remembered per VM. A real sidecar opens one when its buffer
/// overflows while the collector is unreachable, so a handful at most.
pub const MAX_GAPS: usize = 64;

/// A VM's stored sequence numbers, as kept in its `sidecars` row.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    /// The highest sequence committed (0: none).
    through: u64,
    /// At or below this, outside `gaps`, nothing is known any more.
    floor: u64,
    /// Inclusive ranges not stored, ascending, disjoint, each above `floor`
    /// and below `through`.
    gaps: Vec<(u64, u64)>,
}

/// What to do with one event of the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Never stored before: store it.
    New,
    /// Already stored: acknowledge, store nothing.
    Duplicate,
    /// At or below the floor, outside every remembered gap: refuse it.
    Forgotten { floor: u64 },
}

impl Ledger {
    /// The ledger as stored: the highest committed, the floor, and the gaps
    /// as [`Ledger::gaps_text`] wrote them. Malformed or out-of-place gap
    /// entries are dropped (each one only makes a later event of its range
    /// count as a duplicate, which is what the collector did before gaps
    /// were kept).
    pub fn stored(through: u64, floor: u64, gaps: &str) -> Self {
        let mut ledger = Self {
            through,
            floor: floor.min(through),
            gaps: Vec::new(),
        };
        let mut above = ledger.floor;
        for range in gaps.split(',').filter(|r| !r.is_empty()) {
            let Some((from, to)) = range.split_once('-') else {
                continue;
            };
            let (Ok(from), Ok(to)) = (from.parse::<u64>(), to.parse::<u64>()) else {
                continue;
            };
            if from > above && from <= to && to < through {
                ledger.gaps.push((from, to));
                above = to;
            }
        }
        ledger
    }

    pub fn through(&self) -> u64 {
        self.through
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    /// The gaps as stored: `from-to` ranges joined by commas, ascending.
    pub fn gaps_text(&self) -> String {
        use std::fmt::Write;
        let mut text = String::new();
        for (index, (from, to)) in self.gaps.iter().enumerate() {
            let comma = if index == 0 { "" } else { "," };
            let _ = write!(text, "{comma}{from}-{to}");
        }
        text
    }

    /// Decides about `sequence` (at least 1) and records it as stored when new.
    pub fn admit(&mut self, sequence: u64) -> Admission {
        if sequence > self.through {
            if sequence > self.through + 1 {
                self.open_gap(self.through + 1, sequence - 1);
            }
            self.through = sequence;
            return Admission::New;
        }
        // The gap holding `sequence`, if any: the first that ends at or above it.
        let index = self.gaps.partition_point(|&(_, to)| to < sequence);
        match self.gaps.get(index).copied() {
            Some((from, to)) if from <= sequence => {
                let mut rest = Vec::with_capacity(2);
                if from < sequence {
                    rest.push((from, sequence - 1));
                }
                if sequence < to {
                    rest.push((sequence + 1, to));
                }
                self.gaps.splice(index..=index, rest);
                self.forget_beyond_limit();
                Admission::New
            }
            _ if sequence <= self.floor => Admission::Forgotten { floor: self.floor },
            _ => Admission::Duplicate,
        }
    }

    fn open_gap(&mut self, from: u64, to: u64) {
        self.gaps.push((from, to));
        self.forget_beyond_limit();
    }

    fn forget_beyond_limit(&mut self) {
        while self.gaps.len() > MAX_GAPS {
            let (_, to) = self.gaps.remove(0);
            self.floor = self.floor.max(to);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admit_all(ledger: &mut Ledger, sequences: &[u64]) -> Vec<Admission> {
        sequences.iter().map(|&s| ledger.admit(s)).collect()
    }

    use Admission::{Duplicate, New};

    #[test]
    fn in_order_events_are_new_once() {
        let mut ledger = Ledger::default();
        assert_eq!(admit_all(&mut ledger, &[1, 2, 3]), [New, New, New]);
        assert_eq!(
            admit_all(&mut ledger, &[2, 3, 4]),
            [Duplicate, Duplicate, New]
        );
        assert_eq!(ledger.gaps_text(), "");
        assert_eq!(ledger.through(), 4);
    }

    #[test]
    fn a_jump_ahead_leaves_a_gap_that_later_events_fill() {
        let mut ledger = Ledger::default();
        assert_eq!(ledger.admit(10), New);
        assert_eq!(ledger.gaps_text(), "1-9");
        // What a hostile client's jump used to hide: 2 is stored, not dropped.
        assert_eq!(
            admit_all(&mut ledger, &[2, 2, 1, 9]),
            [New, Duplicate, New, New]
        );
        assert_eq!(ledger.gaps_text(), "3-8");
        assert_eq!(admit_all(&mut ledger, &[5, 10, 11]), [New, Duplicate, New]);
        assert_eq!(ledger.gaps_text(), "3-4,6-8");
    }

    #[test]
    fn a_failed_batch_below_a_committed_one_is_stored_when_resent() {
        let mut ledger = Ledger::default();
        // Batch 1..=100 failed to commit; 101..=200 committed.
        for sequence in 101..=200 {
            assert_eq!(ledger.admit(sequence), New);
        }
        // The resend of everything unacknowledged: 1..=200.
        let admitted: Vec<_> = (1..=200).map(|s| ledger.admit(s)).collect();
        assert!(admitted[..100].iter().all(|a| *a == New));
        assert!(admitted[100..].iter().all(|a| *a == Duplicate));
        assert_eq!(ledger, Ledger::stored(200, 0, ""));
    }

    #[test]
    fn beyond_the_gap_limit_the_oldest_gaps_are_forgotten_and_refused() {
        let mut ledger = Ledger::default();
        // Every other sequence: a gap each time.
        for sequence in (2..=2 * (MAX_GAPS as u64 + 3)).step_by(2) {
            assert_eq!(ledger.admit(sequence), New);
        }
        assert_eq!(ledger.gaps.len(), MAX_GAPS);
        assert_eq!(ledger.floor(), 5, "gaps 1, 3 and 5 forgotten");
        for forgotten in [1, 2, 3, 4, 5] {
            assert_eq!(
                ledger.admit(forgotten),
                Admission::Forgotten { floor: 5 },
                "{forgotten}"
            );
        }
        assert_eq!(ledger.admit(7), New);
        assert_eq!(ledger.admit(8), Duplicate);
    }

    #[test]
    fn the_stored_form_reads_back_and_malformed_parts_are_dropped() {
        let mut ledger = Ledger::default();
        admit_all(&mut ledger, &[3, 7, 20, 5]);
        let text = ledger.gaps_text();
        assert_eq!(text, "1-2,4-4,6-6,8-19");
        let back = Ledger::stored(ledger.through(), ledger.floor(), &text);
        assert_eq!(back, ledger);
        // Unparseable, reversed, overlapping, below the floor or above the
        // highest: each dropped on its own.
        let read = Ledger::stored(20, 2, "x,1-2,5-4,3-6,5-7,8-9,15-30,abc-3");
        assert_eq!(read.gaps_text(), "3-6,8-9");
        assert_eq!(Ledger::stored(0, 9, "").floor(), 0);
    }
}
