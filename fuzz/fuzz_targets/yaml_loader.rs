//! Any text through the whole offline pipeline: parse, load, validate, analyze, compile every
//! workload's policy. None of it may panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warden_policy::config::Loader;
use warden_policy::engine::{InlineJwksOnly, WorkloadPolicy};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let mut loader = Loader::new();
    loader.add_text("fuzz.yaml", text);
    let (cfg, _diags) = loader.finish();
    let _ = warden_policy::analyze::analyze(&cfg);
    for wl in &cfg.workloads {
        let _ = WorkloadPolicy::compile(&cfg, wl, &InlineJwksOnly);
    }
});
