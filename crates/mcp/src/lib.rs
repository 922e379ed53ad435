//! forkbox as an MCP server (issue 26): tools that create sandboxes, run code and
//! commands, read, write and list files, fork, merge and delete, and every sandbox as a
//! resource (`forkbox://sandboxes/<id>`), on the `rmcp` crate.
//!
//! The tools are a client of forkbox's own HTTP API, as the CLI and SDKs are: `forkbox
//! mcp` serves them over stdio against a server's URL and key; `forkbox serve` serves
//! them over streamable HTTP at `/mcp`, calling its own API on loopback with each MCP
//! request's own credentials (`Authorization` or `X-API-Key`), so a key reaches
//! exactly what it reaches through the API, and nothing is decided here.

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    AnnotateAble, CallToolResult, Content, ListResourcesResult, PaginatedRequestParams,
    RawResource, ReadResourceRequestParams, ReadResourceResult, ResourceContents,
    ServerCapabilities, ServerInfo,
};
use rmcp::service::RequestContext;
use rmcp::{schemars, tool, tool_handler, tool_router, ErrorData, RoleServer, ServerHandler};
use serde::Deserialize;
use serde_json::{json, Value};

/// Where a sandbox is named as a resource.
const RESOURCE_PREFIX: &str = "forkbox://sandboxes/";

/// The MCP server: forkbox's tools over its HTTP API at `api`.
#[derive(Clone)]
pub struct Forkbox {
    api: String,
    /// The key of `forkbox mcp` (stdio); over `/mcp` each request's own headers.
    key: Option<String>,
    http: reqwest::Client,
    tool_router: ToolRouter<Self>,
}

/// A failed call to forkbox's API, told to the model as a tool error.
#[derive(Debug, thiserror::Error)]
enum CallError {
    #[error("forkbox answered {status}: {body}")]
    Api { status: u16, body: String },
    #[error("forkbox could not be reached: {0}")]
    Http(#[from] reqwest::Error),
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct CreateArgs {
    /// Template to start from (default: the server's default, `python`).
    pub template: Option<String>,
    /// Seconds before the sandbox ends by itself (default: the server's).
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct SandboxArg {
    /// The sandbox's id (`sbx-…`).
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct RunCodeArgs {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// Code for the sandbox's REPL; its state (variables, imports) is kept between calls.
    pub code: String,
    /// `python` (default), `javascript` or `bash`.
    pub language: Option<String>,
    /// Seconds the cell may run.
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ExecArgs {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// A shell command line (`sh -c`).
    pub cmd: String,
    /// Working directory (default `/root`).
    pub cwd: Option<String>,
    /// Seconds the command may run.
    pub timeout: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct PathArgs {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// Absolute, or relative to `/root`.
    pub path: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct WriteArgs {
    /// The sandbox's id.
    pub sandbox_id: String,
    /// Absolute, or relative to `/root`; parent directories are made.
    pub path: String,
    /// The file's whole new content (UTF-8 text).
    pub content: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct ForkArgs {
    /// The sandbox to fork.
    pub sandbox_id: String,
    /// How many children (1–32); each starts from the sandbox's files and Python REPL.
    pub n: Option<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
pub struct MergeArgs {
    /// The parent sandbox, which takes over the winner's state.
    pub parent_id: String,
    /// The fork descendant whose state wins.
    pub child_id: String,
}

/// A path segment of the API from a caller's argument.
fn seg(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Forkbox {
    /// Tools against forkbox's API at `api` (`http://127.0.0.1:7070`), with `key` if
    /// the server requires one (over `/mcp`, each request's own credentials instead).
    pub fn new(api: impl Into<String>, key: Option<String>) -> Forkbox {
        Forkbox {
            api: api.into().trim_end_matches('/').to_owned(),
            key,
            // Never through a proxy from the environment: the caller's key goes to the
            // server itself, on loopback.
            http: reqwest::Client::builder()
                .no_proxy()
                .build()
                .unwrap_or_default(),
            tool_router: Self::tool_router(),
        }
    }

    /// A request to the API carrying the caller's credentials.
    fn request(
        &self,
        ctx: &RequestContext<RoleServer>,
        method: reqwest::Method,
        path: &str,
    ) -> reqwest::RequestBuilder {
        let mut r = self.http.request(method, format!("{}{path}", self.api));
        match ctx.extensions.get::<http::request::Parts>() {
            Some(parts) => {
                for h in [http::header::AUTHORIZATION.as_str(), "x-api-key"] {
                    if let Some(v) = parts.headers.get(h) {
                        r = r.header(h, v.as_bytes());
                    }
                }
            }
            None => {
                if let Some(k) = &self.key {
                    r = r.bearer_auth(k);
                }
            }
        }
        r
    }

    async fn send(&self, r: reqwest::RequestBuilder) -> Result<reqwest::Response, CallError> {
        let resp = r.send().await?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            let body = resp.text().await.unwrap_or_default();
            return Err(CallError::Api { status, body });
        }
        Ok(resp)
    }

    async fn json(
        &self,
        ctx: &RequestContext<RoleServer>,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, CallError> {
        let mut r = self.request(ctx, method, path);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = self.send(r).await?;
        let text = resp.text().await?;
        Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// `POST …/exec`: the NDJSON events gathered into stdout, stderr and exit code.
    async fn exec_body(
        &self,
        ctx: &RequestContext<RoleServer>,
        id: &str,
        body: Value,
    ) -> Result<Value, CallError> {
        let r = self
            .request(
                ctx,
                reqwest::Method::POST,
                &format!("/v1/sandboxes/{}/exec", seg(id)),
            )
            .json(&body);
        let text = self.send(r).await?.text().await?;
        let (mut stdout, mut stderr, mut exit_code, mut other) =
            (String::new(), String::new(), Value::Null, Vec::new());
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let e: Value = serde_json::from_str(line).unwrap_or(Value::Null);
            match e["type"].as_str() {
                Some("stdout") => stdout.push_str(e["data"].as_str().unwrap_or_default()),
                Some("stderr") => stderr.push_str(e["data"].as_str().unwrap_or_default()),
                Some("exit") => exit_code = e["data"].clone(),
                _ => other.push(e),
            }
        }
        let mut out = json!({"stdout": stdout, "stderr": stderr, "exit_code": exit_code});
        if !other.is_empty() {
            out["events"] = Value::Array(other);
        }
        Ok(out)
    }
}

/// A tool's answer: the API's JSON as text, or its refusal as a tool error.
fn answer(r: Result<Value, CallError>) -> Result<CallToolResult, ErrorData> {
    Ok(match r {
        Ok(Value::String(s)) => CallToolResult::success(vec![Content::text(s)]),
        Ok(v) => CallToolResult::success(vec![Content::text(
            serde_json::to_string_pretty(&v).unwrap_or_default(),
        )]),
        Err(e) => CallToolResult::error(vec![Content::text(e.to_string())]),
    })
}

#[tool_router]
impl Forkbox {
    #[tool(
        description = "Create a sandbox: an isolated Linux machine with Python; returns its id and details."
    )]
    async fn create_sandbox(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<CreateArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({});
        if let Some(t) = a.template {
            body["template"] = json!(t);
        }
        if let Some(t) = a.timeout {
            body["timeout"] = json!(t);
        }
        answer(
            self.json(&ctx, reqwest::Method::POST, "/v1/sandboxes", Some(body))
                .await,
        )
    }

    #[tool(description = "List the sandboxes this key can reach.")]
    async fn list_sandboxes(
        &self,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        answer(
            self.json(&ctx, reqwest::Method::GET, "/v1/sandboxes", None)
                .await,
        )
    }

    #[tool(
        description = "Run code in the sandbox's REPL (state is kept between calls); returns stdout, stderr and exit_code."
    )]
    async fn run_code(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<RunCodeArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({"code": a.code});
        if let Some(l) = a.language {
            body["language"] = json!(l);
        }
        if let Some(t) = a.timeout {
            body["timeout"] = json!(t);
        }
        answer(self.exec_body(&ctx, &a.sandbox_id, body).await)
    }

    #[tool(
        description = "Run a shell command in the sandbox; returns stdout, stderr and exit_code."
    )]
    async fn exec(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<ExecArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let mut body = json!({"cmd": a.cmd});
        if let Some(c) = a.cwd {
            body["cwd"] = json!(c);
        }
        if let Some(t) = a.timeout {
            body["timeout"] = json!(t);
        }
        answer(self.exec_body(&ctx, &a.sandbox_id, body).await)
    }

    #[tool(description = "Read a file of the sandbox (as UTF-8 text, invalid bytes replaced).")]
    async fn read_file(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!(
            "/v1/sandboxes/{}/files?path={}",
            seg(&a.sandbox_id),
            seg(&a.path)
        );
        let r = self.request(&ctx, reqwest::Method::GET, &path);
        answer(
            async {
                let bytes = self.send(r).await?.bytes().await?;
                Ok(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            }
            .await,
        )
    }

    #[tool(
        description = "Write a file of the sandbox (its whole content; parent directories are made)."
    )]
    async fn write_file(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<WriteArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!(
            "/v1/sandboxes/{}/files?path={}",
            seg(&a.sandbox_id),
            seg(&a.path)
        );
        let r = self
            .request(&ctx, reqwest::Method::PUT, &path)
            .body(a.content);
        answer(async { Ok(self.send(r).await?.json::<Value>().await?) }.await)
    }

    #[tool(description = "List a directory of the sandbox.")]
    async fn list_files(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<PathArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!(
            "/v1/sandboxes/{}/files/ls?path={}",
            seg(&a.sandbox_id),
            seg(&a.path)
        );
        answer(self.json(&ctx, reqwest::Method::GET, &path, None).await)
    }

    #[tool(
        description = "Fork a running sandbox into n copy-on-write children (files and Python REPL state); returns their ids."
    )]
    async fn fork(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<ForkArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}/fork", seg(&a.sandbox_id));
        let body = json!({"n": a.n.unwrap_or(1)});
        answer(
            self.json(&ctx, reqwest::Method::POST, &path, Some(body))
                .await,
        )
    }

    #[tool(
        description = "Merge a fork descendant into its parent: the parent's id then refers to the child's state."
    )]
    async fn merge(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<MergeArgs>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!(
            "/v1/sandboxes/{}/merge_into/{}",
            seg(&a.parent_id),
            seg(&a.child_id)
        );
        answer(
            self.json(&ctx, reqwest::Method::POST, &path, Some(json!({})))
                .await,
        )
    }

    #[tool(description = "Delete a sandbox and everything in it.")]
    async fn delete_sandbox(
        &self,
        ctx: RequestContext<RoleServer>,
        Parameters(a): Parameters<SandboxArg>,
    ) -> Result<CallToolResult, ErrorData> {
        let path = format!("/v1/sandboxes/{}", seg(&a.sandbox_id));
        let r = self.request(&ctx, reqwest::Method::DELETE, &path);
        answer(
            self.send(r)
                .await
                .map(|_| Value::String(format!("deleted {}", a.sandbox_id))),
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Forkbox {
    fn get_info(&self) -> ServerInfo {
        ServerInfo::new(
            ServerCapabilities::builder()
                .enable_tools()
                .enable_resources()
                .build(),
        )
        .with_instructions(
            "forkbox: isolated sandboxes for running code. Create one, run code or \
             commands in it, read and write its files, fork it to try several things at \
             once, merge the winner back, delete it when done.",
        )
    }

    async fn list_resources(
        &self,
        _request: Option<PaginatedRequestParams>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ListResourcesResult, ErrorData> {
        let list = self
            .json(&ctx, reqwest::Method::GET, "/v1/sandboxes", None)
            .await
            .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        let resources = list["sandboxes"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["id"].as_str())
            .map(|id| RawResource::new(format!("{RESOURCE_PREFIX}{id}"), id).no_annotation())
            .collect();
        Ok(ListResourcesResult {
            resources,
            ..Default::default()
        })
    }

    async fn read_resource(
        &self,
        request: ReadResourceRequestParams,
        ctx: RequestContext<RoleServer>,
    ) -> Result<ReadResourceResult, ErrorData> {
        let id = request
            .uri
            .strip_prefix(RESOURCE_PREFIX)
            .ok_or_else(|| ErrorData::resource_not_found("not a forkbox sandbox", None))?;
        let v = self
            .json(
                &ctx,
                reqwest::Method::GET,
                &format!("/v1/sandboxes/{}", seg(id)),
                None,
            )
            .await
            .map_err(|e| ErrorData::resource_not_found(e.to_string(), None))?;
        Ok(ReadResourceResult::new(vec![ResourceContents::text(
            serde_json::to_string_pretty(&v).unwrap_or_default(),
            request.uri,
        )]))
    }
}

/// The tools over stdio until the client closes it (`forkbox mcp`).
pub async fn serve_stdio(server: Forkbox) -> Result<(), std::io::Error> {
    use rmcp::ServiceExt;
    let running = server
        .serve(rmcp::transport::stdio())
        .await
        .map_err(std::io::Error::other)?;
    running.waiting().await.map_err(std::io::Error::other)?;
    Ok(())
}

/// The streamable HTTP service for `/mcp` of a server whose API is at `api`, answering
/// `Host` names the server itself accepts (its own guard runs first).
pub fn http_service(
    api: String,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    Forkbox,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService,
    };
    StreamableHttpService::new(
        move || Ok(Forkbox::new(api.clone(), None)),
        Default::default(),
        StreamableHttpServerConfig::default().disable_allowed_hosts(),
    )
}
