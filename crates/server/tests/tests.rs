//! Integration tests against real `tidewater serve` processes (one test binary).

mod support;

mod cli;
mod crash;
mod disk_full;
mod http_api;
