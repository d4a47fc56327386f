//! stepup-v1 (placeholder until the step-up work lands)
