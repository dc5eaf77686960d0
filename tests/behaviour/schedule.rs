//! Schedules are pure functions of the step, equal to the originals' numpy values.
//!
//! `tests/fixtures/schedule.json` is written by `scripts/fixtures/schedule.py`
//! from `numpy.linspace` and from miguelvr/dropblock's `LinearScheduler` itself.

use dropblock::{tpu_group_keep_prob, Error, LinearSchedule};
use serde_json::Value;

const FIXTURE: &str = include_str!("../fixtures/schedule.json");

fn float(v: &Value) -> f64 {
    v.as_str().expect("values are repr strings").parse().unwrap()
}

/// Every step's value equals numpy's `linspace` bit for bit (n = 1 and n = 2,
/// a flat ramp and an underflowing step included), the last value holds after the
/// ramp, and the drop schedule equals what miguelvr's scheduler sets step by step.
#[test]
fn values_are_numpy_linspace_bit_for_bit() {
    let cases: Vec<Value> = serde_json::from_str(FIXTURE).expect("tests/fixtures/schedule.json parses");
    assert!(cases.len() >= 9);
    for case in &cases {
        let (start, stop, n) =
            (case["start"].as_f64().unwrap(), case["stop"].as_f64().unwrap(), case["n"].as_u64().unwrap());
        let linspace: Vec<f64> = case["linspace"].as_array().unwrap().iter().map(float).collect();
        assert_eq!(linspace.len() as u64, n);
        let drop = LinearSchedule::drop_prob(start, stop, n).unwrap();
        let keep = LinearSchedule::keep_prob(start, stop, n).unwrap();
        for step in 0..n + 3 {
            let want = linspace[step.min(n - 1) as usize];
            let ctx = format!("linspace({start}, {stop}, {n}) at step {step}");
            assert_eq!(
                drop.drop_prob_at(step).to_bits(),
                want.to_bits(),
                "{ctx}: {} vs {want}",
                drop.drop_prob_at(step)
            );
            assert_eq!(keep.keep_prob_at(step).to_bits(), want.to_bits(), "{ctx} (keep)");
            assert_eq!(keep.drop_prob_at(step), 1.0 - want, "{ctx} (keep as drop)");
        }
        // miguelvr's own scheduler's values, step by step past its end (a fixture
        // regenerated without torch or the package has none, and must not pass).
        let set = case["scheduler"].as_array().expect("the fixture holds miguelvr's scheduler values");
        assert_eq!(set.len() as u64, n + 3, "miguelvr's values for linspace({start}, {stop}, {n})");
        for (step, v) in set.iter().enumerate() {
            assert_eq!(drop.drop_prob_at(step as u64).to_bits(), float(v).to_bits(), "miguelvr step {step}");
        }
    }
}

#[test]
fn any_step_can_be_asked_in_any_order() {
    // No hidden step counter: asking out of order, or again, gives the same value.
    let s = LinearSchedule::drop_prob(0.02, 0.2, 37).unwrap();
    let in_order: Vec<f64> = (0..40).map(|i| s.drop_prob_at(i)).collect();
    for step in [39, 13, 0, 36, 13, 37, 1] {
        assert_eq!(s.drop_prob_at(step), in_order[step as usize], "step {step}");
    }
    assert_eq!(s.drop_prob_at(36), 0.2);
    assert_eq!(s.drop_prob_at(u64::MAX), 0.2);
    assert!((0..36).all(|i| in_order[i] < in_order[i + 1]), "monotone along the ramp");
}

#[test]
fn a_schedule_of_no_steps_is_an_error() {
    assert_eq!(LinearSchedule::drop_prob(0.0, 0.3, 0), Err(Error::EmptySchedule));
    assert_eq!(LinearSchedule::keep_prob(1.0, 0.9, 0), Err(Error::EmptySchedule));
    let one = LinearSchedule::drop_prob(0.1, 0.3, 1).unwrap();
    assert_eq!((one.drop_prob_at(0), one.drop_prob_at(5)), (0.1, 0.1), "linspace(a, b, 1) == [a], held");
}

#[test]
fn tpu_group_rule() {
    assert!((tpu_group_keep_prob(0.9, 4).unwrap() - 0.9).abs() < 1e-15);
    assert!((tpu_group_keep_prob(0.9, 3).unwrap() - 0.975).abs() < 1e-15);
    assert!((tpu_group_keep_prob(0.9, 1).unwrap() - (1.0 - 0.1 / 64.0)).abs() < 1e-15);
    assert_eq!(tpu_group_keep_prob(0.9, 0), Err(Error::InvalidGroup(0)));
    assert_eq!(tpu_group_keep_prob(0.9, 5), Err(Error::InvalidGroup(5)));
    assert!(matches!(tpu_group_keep_prob(1.5, 3), Err(Error::InvalidKeepProb(_))));
}

#[test]
fn bad_probabilities_are_errors() {
    assert!(matches!(LinearSchedule::drop_prob(-0.1, 0.1, 5), Err(Error::InvalidDropProb(_))));
    assert!(matches!(LinearSchedule::drop_prob(0.0, f64::NAN, 5), Err(Error::InvalidDropProb(_))));
    assert!(matches!(LinearSchedule::keep_prob(1.0, 1.2, 5), Err(Error::InvalidKeepProb(_))));
}
