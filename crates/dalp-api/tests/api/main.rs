//! HTTP tests: each test spawns the real API on a free port over its own migrated database.

mod assets;
mod audit;
mod boundaries;
mod cache;
mod helpers;
mod identity;
mod indexed;
mod injection;
mod metrics;
mod settings;
mod workflows;
