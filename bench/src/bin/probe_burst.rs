use pgcachewatch::strategies::Greedy;
use pgcachewatch::{
    Cache, Dispatcher, EventSource, Health, InlineAttachment, InlineHandler, PayloadParser, Signal,
    SignalHub, Subscription,
};
use std::sync::Arc;
#[derive(Debug)]
struct Src(Arc<SignalHub>);
impl EventSource for Src {
    fn subscribe(&self) -> Subscription {
        self.0.subscribe()
    }
    fn health(&self) -> Health {
        self.0.health()
    }
    fn attach_inline(&self, h: InlineHandler) -> Option<InlineAttachment> {
        Some(self.0.attach_inline(h))
    }
    fn label(&self) -> String {
        "probe".into()
    }
}
fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(100_000);
    let payloads: Vec<String> = (1..=n).map(|g| format!(
        "{{\"operation\" : \"update\", \"schema\" : \"public\", \"table\" : \"burst\", \"sent_at\" : \"2026-11-25T11:00:00.{:06}+00:00\", \"txid\" : {g}}}", g % 1_000_000)).collect();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let hub = Arc::new(SignalHub::with_health(1024, Health::Healthy));
        let src = Src(hub.clone());
        let cache: Cache<u64, u64> = Cache::new(16);
        let _d = Dispatcher::new()
            .attach(Greedy::new(), cache.clone())
            .spawn(&src);
        let received_at = chrono::Utc::now();
        let mut parser = PayloadParser::new();
        let t = std::time::Instant::now();
        run(&hub, &mut parser, &payloads, received_at);
        eprintln!("{:.0} ns/event", t.elapsed().as_secs_f64() * 1e9 / n as f64);
    });
}

#[inline(never)]
fn run(
    hub: &SignalHub,
    parser: &mut PayloadParser,
    payloads: &[String],
    received_at: chrono::DateTime<chrono::Utc>,
) {
    let mut batch = Vec::with_capacity(256);
    for chunk in payloads.chunks(256) {
        for p in chunk {
            if let Ok(e) = parser.parse_shared("ch", p, received_at) {
                batch.push(Signal::Event(e));
            }
        }
        if std::env::var("OLD").is_ok() {
            hub.send_all(batch.drain(..));
        } else {
            hub.send_slice(&batch);
            for s in batch.drain(..) {
                if let Signal::Event(e) = s {
                    parser.recycle(e);
                }
            }
        }
    }
}
