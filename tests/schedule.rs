//! Schedules are pure functions of the step.

use dropblock::{tpu_group_keep_prob, Error, LinearSchedule};

#[test]
fn linear_ramp_then_hold() {
    let s = LinearSchedule::drop_prob(0.0, 0.1, 100).unwrap();
    assert_eq!(s.drop_prob_at(0), 0.0);
    assert!((s.drop_prob_at(50) - 0.05).abs() < 1e-15);
    assert!((s.drop_prob_at(25) - 0.025).abs() < 1e-15);
    assert_eq!(s.drop_prob_at(100), 0.1);
    assert_eq!(s.drop_prob_at(1_000_000), 0.1);
    // Monotone along the ramp.
    assert!((0..100).all(|i| s.drop_prob_at(i) <= s.drop_prob_at(i + 1)));
}

#[test]
fn keep_prob_schedule_is_the_paper_ramp() {
    let s = LinearSchedule::keep_prob(1.0, 0.9, 10).unwrap();
    assert_eq!(s.keep_prob_at(0), 1.0);
    assert!((s.keep_prob_at(5) - 0.95).abs() < 1e-15);
    assert!((s.drop_prob_at(10) - 0.1).abs() < 1e-15);
}

#[test]
fn any_step_can_be_asked_in_any_order() {
    // No hidden step counter: asking out of order, or again, gives the closed form.
    let s = LinearSchedule::drop_prob(0.02, 0.2, 37).unwrap();
    for step in [90, 13, 0, 36, 13, 37, 1] {
        let want = if step >= 37 { 0.2 } else { 0.02 + (0.2 - 0.02) * step as f64 / 37.0 };
        assert!((s.drop_prob_at(step) - want).abs() < 1e-15, "step {step}");
    }
}

#[test]
fn zero_steps_holds_stop() {
    let s = LinearSchedule::drop_prob(0.0, 0.3, 0).unwrap();
    assert_eq!(s.drop_prob_at(0), 0.3);
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
