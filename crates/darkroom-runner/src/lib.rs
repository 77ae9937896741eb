//! The Darkroom runner: a process that serves one app. It dials *out* to the gateway and keeps one control channel
//! (a WebSocket) open; see `darkroom_core::protocol`. [`local`] supervises runner processes on this machine.

pub mod agent;
pub mod files;
pub mod local;
pub mod tls;

pub use agent::{RunnerConfig, run_runner};
