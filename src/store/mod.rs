//! Challenge state: the `ChallengeStore` trait and its implementations.
