//! Integration tests: the real worker binary, the real broker, and `fake-apptainer`.
//!
//! Each test spawns its own worker (own queues, data directory and fake state) through
//! `helpers::spawn_worker`, so tests run in parallel without sharing anything.

mod helpers;

mod failures;
mod hostile;
mod invalid_requests;
mod lifecycle;
mod ordering;
mod recovery;
mod secrets;
