//! The fleet (DESIGN.md, "Fleet"): what makes this worker one host among many on one RabbitMQ.
//!
//! The admin plane lives here: [`roster`] (the hosts heard of), [`lease`] (is a host alive, how
//! deep is its queue), [`gather`] (ask every host, collect the answers), [`hosts`] (the table of
//! `orchestrator fleet hosts`) and [`admin`], which handles the admin messages the intake hands
//! over and answers the fleet-wide `getallcont`. Below the intake, above the scheduler.

pub mod admin;
pub mod gather;
pub mod hosts;
pub mod lease;
pub mod roster;

pub use admin::{Admin, AdminConfig, AdminMessage};
