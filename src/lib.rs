//! totango-destination: a Segment-compatible destination server for Totango.

pub mod budget;
pub mod cli;
pub mod config;
pub mod delivery;
pub mod ingest;
pub mod insights;
pub mod mapping;
pub mod openapi;
pub mod rules;
pub mod secret;
pub mod segment;
pub mod server;
pub mod storage;
pub mod telemetry;
pub mod web;

pub use server::run;
pub mod admin;
pub mod backpressure;
