//! Deterministic ids for derived events.
//!
//! An inference or an action derived from an input event gets an id computed from the input's
//! id and the deriving step, so a replay or a retry of the same input produces the same id and
//! the consumers' dedup on `event_id` absorbs it.

use uuid::Uuid;

/// The UUID v5 namespace of Sluice's derived ids. Fixed forever: changing it would make every
/// replay after an upgrade look like new events.
pub const SLUICE_NAMESPACE: Uuid = Uuid::from_u128(0x6f3c_2a1e_9b4d_5c07_8e21_4d3a_5b6c_7d8e);

/// The id of the event that `step` derives from the event `parent`.
///
/// `step` names the deriving step and everything that makes its output distinct, e.g.
/// `"inferencer/anomaly-iforest@3"` or `"action-router/rule=overheat@2/endpoint=ops"`. Two
/// different steps over the same parent never collide; the same step over the same parent
/// always gives the same id.
pub fn derived_event_id(parent: Uuid, step: &str) -> Uuid {
    // Parent bytes first, fixed length, so no (parent, step) pair can alias another.
    let mut name = Vec::with_capacity(16 + step.len());
    name.extend_from_slice(parent.as_bytes());
    name.extend_from_slice(step.as_bytes());
    Uuid::new_v5(&SLUICE_NAMESPACE, &name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_parent_and_step_give_the_same_id() {
        let parent = Uuid::from_u128(42);
        assert_eq!(
            derived_event_id(parent, "inferencer/m@1"),
            derived_event_id(parent, "inferencer/m@1")
        );
    }

    #[test]
    fn derived_ids_are_version_5() {
        let id = derived_event_id(Uuid::from_u128(7), "x");
        assert_eq!(id.get_version_num(), 5);
    }

    proptest! {
        #[test]
        fn different_steps_or_parents_give_different_ids(
            a in any::<u128>(), b in any::<u128>(), s in "[a-z/@=0-9]{0,24}", t in "[a-z/@=0-9]{0,24}"
        ) {
            let (pa, pb) = (Uuid::from_u128(a), Uuid::from_u128(b));
            if (a, &s) != (b, &t) {
                prop_assert_ne!(derived_event_id(pa, &s), derived_event_id(pb, &t));
            }
        }

        #[test]
        fn derived_id_differs_from_parent(a in any::<u128>(), s in ".{0,16}") {
            let parent = Uuid::from_u128(a);
            prop_assert_ne!(derived_event_id(parent, &s), parent);
        }
    }
}
