//! W3C trace context (`traceparent`): parsed from requests and sandbox creation, and
//! attached to the spans (so every log line) of the work done for them.

/// A parsed `traceparent`: `00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: String,
    pub parent_span_id: String,
    pub flags: String,
}

impl TraceParent {
    pub fn parse(s: &str) -> Option<TraceParent> {
        let parts: Vec<&str> = s.trim().split('-').collect();
        let hex = |p: &str, n: usize| p.len() == n && p.bytes().all(|b| b.is_ascii_hexdigit());
        match parts[..] {
            // 16-hex (64-bit) trace ids, as some tracers and docs use, are padded.
            [v, t, p, f] if hex(t, 16) => TraceParent::parse(&format!("{v}-{:0>32}-{p}-{f}", t)),
            [v, t, p, f]
                if hex(v, 2)
                    && v != "ff"
                    && hex(t, 32)
                    && hex(p, 16)
                    && hex(f, 2)
                    && t.bytes().any(|b| b != b'0')
                    && p.bytes().any(|b| b != b'0') =>
            {
                Some(TraceParent {
                    trace_id: t.to_ascii_lowercase(),
                    parent_span_id: p.to_ascii_lowercase(),
                    flags: f.to_ascii_lowercase(),
                })
            }
            _ => None,
        }
    }

    /// A span carrying the trace ids, for the work of one operation; exported spans
    /// (OTLP, when configured) are children of the caller's span.
    pub fn span(&self, op: &'static str, sandbox: &str) -> tracing::Span {
        let span = tracing::info_span!(
            "op",
            op,
            sandbox,
            trace_id = %self.trace_id,
            parent_span_id = %self.parent_span_id
        );
        self.adopt(&span);
        span
    }

    /// Makes the caller's span the OpenTelemetry parent of `span`.
    pub fn adopt(&self, span: &tracing::Span) {
        use opentelemetry::trace::{
            SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState,
        };
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;
        let (Ok(t), Ok(p)) = (
            TraceId::from_hex(&self.trace_id),
            SpanId::from_hex(&self.parent_span_id),
        ) else {
            return;
        };
        let flags = u8::from_str_radix(&self.flags, 16).unwrap_or(1);
        let sc = SpanContext::new(t, p, TraceFlags::new(flags), true, TraceState::default());
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(sc));
    }

    pub fn header(&self) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id, self.parent_span_id, self.flags
        )
    }
}

/// The span of an operation on `sandbox`: traced when a trace context is known.
pub fn op_span(tp: Option<&TraceParent>, op: &'static str, sandbox: &str) -> tracing::Span {
    match tp {
        Some(t) => t.span(op, sandbox),
        None => tracing::info_span!("op", op, sandbox),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_w3c_traceparent() {
        let t =
            TraceParent::parse("00-4bf92f3564d486ad4bf92f3564d486ad-00f067aa0ba902b7-01").unwrap();
        assert_eq!(t.trace_id, "4bf92f3564d486ad4bf92f3564d486ad");
        assert_eq!(t.parent_span_id, "00f067aa0ba902b7");
        assert_eq!(
            t.header(),
            "00-4bf92f3564d486ad4bf92f3564d486ad-00f067aa0ba902b7-01"
        );
        // A 64-bit trace id is padded.
        let short = TraceParent::parse("00-4bf92f3564d486ad-00f067aa0ba902b7-01").unwrap();
        assert_eq!(short.trace_id, "00000000000000004bf92f3564d486ad");
        for bad in [
            "",
            "00-4bf92f3564d486-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "ff-4bf92f3564d486ad4bf92f3564d486ad-00f067aa0ba902b7-01",
            "00-4bf92f3564d486ad4bf92f3564d486az-00f067aa0ba902b7-01",
        ] {
            assert!(TraceParent::parse(bad).is_none(), "{bad}");
        }
    }
}
