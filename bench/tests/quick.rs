//! The benchmark's quick mode, run by `cargo xtask test`: variants 1, 3 and
//! 4 under callgrind with a few connections each. It checks that the
//! measurement works (positive instruction counts, every connection
//! answered, every misrouted connection of (4) stored by the collector),
//! never the performance targets, which are too noisy for a test.

use std::time::Duration;

use dialguard_bench::{Options, Parts, Variant};

#[test]
fn quick_benchmark_measures_inside_envoy() -> anyhow::Result<()> {
    let options = Options {
        connections: 20,
        warmup: 5,
        variants: vec![
            Variant::Plain,
            Variant::DialguardAudit,
            Variant::DialguardMisrouted,
        ],
        system_connections: None,
        memory: false,
        long_lived_chunks: Some(50),
        settle: Duration::from_secs(1),
        progress: true,
        keep: None,
    };
    let results = dialguard_bench::run(&Parts::from_dist()?, &options)?;
    println!("{}", results.render());
    assert_eq!(results.variants.len(), 3);
    for r in &results.variants {
        assert_eq!(r.driven.connections, 20, "{:?}", r.variant);
        assert_eq!(
            r.driven.answered, 20,
            "{:?}: every connection answered",
            r.variant
        );
        assert!(
            r.instructions > 0,
            "{:?}: no instructions counted",
            r.variant
        );
        assert!(
            r.per_connection() > 1000.0,
            "{:?}: {}",
            r.variant,
            r.per_connection()
        );
    }
    let misrouted = results
        .variant(Variant::DialguardMisrouted)
        .and_then(|r| r.reporting)
        .ok_or_else(|| anyhow::anyhow!("(4) has no reporting figures"))?;
    assert_eq!(misrouted.expected, 20);
    assert_eq!(
        misrouted.items, 20,
        "every misrouted connection of (4) reached the collector"
    );
    assert!(misrouted.wire_bytes > 0);
    assert_eq!(results.long_lived.len(), 2, "(1) and (3) held open");
    for l in &results.long_lived {
        assert_eq!(l.chunks, 50);
        assert!(l.per_chunk() > 100.0, "{l:?}: nothing counted per chunk");
    }
    Ok(())
}
