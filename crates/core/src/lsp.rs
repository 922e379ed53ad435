//! The LSP bridge's one change to what a client sends: its `initialize` request is
//! made true inside the sandbox. The client's `processId` names a process on the
//! client's machine (a language server that watches it would exit at once), so it
//! becomes `null`; a client that names no workspace (`rootUri`, `rootPath` and
//! `workspaceFolders` all absent or null) gets the sandbox directory the server runs
//! in. Every other message, and every URI, passes unchanged: URIs name sandbox paths
//! (`file:///root/app.py`).

use serde_json::{json, Value};

/// `body` (one JSON-RPC message from the client) as the language server gets it; a
/// body that is not a JSON object passes as it is (the server answers its error).
pub fn client_message(body: &[u8], root: &str) -> Vec<u8> {
    /// Just the method (the rest skipped, not built: a message may be megabytes).
    #[derive(serde::Deserialize)]
    struct Probe {
        method: Option<String>,
    }
    let is_initialize = serde_json::from_slice::<Probe>(body)
        .is_ok_and(|p| p.method.as_deref() == Some("initialize"));
    if !is_initialize {
        return body.to_vec();
    }
    let Ok(mut msg) = serde_json::from_slice::<Value>(body) else {
        return body.to_vec();
    };
    let Some(params) = msg.get_mut("params").and_then(Value::as_object_mut) else {
        return body.to_vec();
    };
    params.insert("processId".into(), Value::Null);
    let unset = |k: &str| params.get(k).is_none_or(Value::is_null);
    if unset("rootUri") && unset("rootPath") && unset("workspaceFolders") {
        let uri = file_uri(root);
        let name = root.rsplit('/').find(|s| !s.is_empty()).unwrap_or("/");
        params.insert("rootUri".into(), json!(uri));
        params.insert("rootPath".into(), json!(root));
        params.insert(
            "workspaceFolders".into(),
            json!([{ "uri": uri, "name": name }]),
        );
    }
    serde_json::to_vec(&msg).unwrap_or_else(|_| body.to_vec())
}

/// A `file://` URI of an absolute path (bytes outside unreserved characters and `/`
/// percent-encoded).
pub fn file_uri(path: &str) -> String {
    let mut out = String::from("file://");
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"/-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adapted(msg: Value) -> Value {
        serde_json::from_slice(&client_message(msg.to_string().as_bytes(), "/root/my app")).unwrap()
    }

    #[test]
    fn initialize_gets_the_sandbox_workspace_when_it_names_none() {
        let out = adapted(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"processId": 4242, "rootUri": null, "capabilities": {}}}));
        assert_eq!(out["params"]["processId"], Value::Null);
        assert_eq!(out["params"]["rootUri"], "file:///root/my%20app");
        assert_eq!(out["params"]["rootPath"], "/root/my app");
        assert_eq!(
            out["params"]["workspaceFolders"],
            json!([{"uri": "file:///root/my%20app", "name": "my app"}])
        );
        assert_eq!(out["params"]["capabilities"], json!({}));
    }

    #[test]
    fn a_named_workspace_and_other_messages_are_kept() {
        let out = adapted(json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"processId": 7, "rootUri": "file:///srv"}}));
        assert_eq!(out["params"]["rootUri"], "file:///srv");
        assert!(out["params"].get("workspaceFolders").is_none());
        assert_eq!(out["params"]["processId"], Value::Null);
        for body in [
            br#"{"jsonrpc":"2.0","method":"initialized","params":{"processId":3}}"#.to_vec(),
            b"not json".to_vec(),
            br#"{"method":"initialize","params":[1]}"#.to_vec(),
        ] {
            assert_eq!(client_message(&body, "/root"), body);
        }
        assert_eq!(file_uri("/"), "file:///");
    }
}
