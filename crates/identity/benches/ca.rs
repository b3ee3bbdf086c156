//! Issuance throughput: one pre-made P-256 CSR signed into an X.509 SVID over and over, as the
//! CA service does for every workload renewal (CSR parse + signature check + sign + PEM).

use std::hint::black_box;
use std::time::SystemTime;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use warden_identity::ca::{Ca, KeyAlg};
use warden_identity::csr::generate_csr;
use warden_identity::spiffe::SpiffeId;

fn sign_p256(c: &mut Criterion) {
    let dir = std::env::temp_dir().join(format!("warden-bench-ca-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let ca = Ca::init(&dir, "cluster.local", KeyAlg::EcP256).expect("init CA");
    let id: SpiffeId = "spiffe://cluster.local/ns/bench/sa/workload"
        .parse()
        .expect("SPIFFE ID");
    let (_key, csr) = generate_csr(&id, KeyAlg::EcP256).expect("CSR");
    let now = SystemTime::now();

    let mut g = c.benchmark_group("ca");
    g.throughput(Throughput::Elements(1));
    g.bench_function("sign_csr_p256", |b| {
        b.iter(|| ca.sign_csr(black_box(&csr), &id, None, now).expect("issue"))
    });
    g.finish();
    let _ = std::fs::remove_dir_all(&dir);
}

criterion_group!(benches, sign_p256);
criterion_main!(benches);
