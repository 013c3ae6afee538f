//! Integration tests: the real worker binary, the real broker, and `fake-apptainer`.
//!
//! Each test spawns its own worker (own queues, data directory and fake state) through
//! `helpers::spawn_worker`, so tests run in parallel without sharing anything.

mod helpers;

mod chaos;
mod check;
mod cli;
mod compose;
mod containment;
mod delivery;
mod deployment;
mod failures;
mod faults;
mod fleet;
mod fleet_admin;
mod fleet_proofs;
mod hostile;
mod http;
mod idempotency;
mod invalid_requests;
mod lifecycle;
mod logs;
mod messages;
mod ordering;
mod private_broker;
mod process;
mod progress;
mod recovery;
mod secrets;
