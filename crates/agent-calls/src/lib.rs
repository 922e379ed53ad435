//! The `Instance` calls every runtime makes the same way — through the sandbox's agent
//! — with the agent's failures mapped into core's terms once: exec and run_code,
//! background commands, files, watch, terminals, preview ports. The jail and vm
//! runtimes hand their calls to [`Agent`] and keep only what differs between them
//! (how a sandbox is made, paused, forked, ended).
//!
//! Mapping: an agent that cannot be reached, or breaks off a stream, is
//! [`RuntimeError::Agent`]; a refusal means what the kind the agent gave says
//! ([`forkbox_types::agent::Refusal`], mapped once by [`RuntimeError::refused`]): a bad
//! request, no such background command, a file error of a kind, a closed port.

use bytes::Bytes;
use forkbox_agent_client::{AgentClient, AgentError, EventStream};
use forkbox_core::runtime::{AgentEvents, ByteStream, RuntimeError, UploadStream, WatchEvents};
use forkbox_types::agent::{
    BgInfo, ExecRequest, FileOp, FileOpReply, ListeningPort, PtyRequest, RunCodeRequest, WriteReply,
};
use futures_util::stream::BoxStream;
use futures_util::StreamExt as _;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One sandbox's agent, for one call.
pub struct Agent<'a> {
    id: &'a str,
    client: &'a AgentClient,
}

impl<'a> Agent<'a> {
    /// Sandbox `id`'s agent, reached through `client`.
    pub fn new(id: &'a str, client: &'a AgentClient) -> Agent<'a> {
        Agent { id, client }
    }

    /// The agent could not be reached (or broke off).
    pub fn unreachable(&self, source: impl Into<BoxError>) -> RuntimeError {
        RuntimeError::Agent {
            id: self.id.to_owned(),
            source: source.into(),
        }
    }

    /// A failure of call `op`: a refusal means what its kind says.
    fn failed(&self, op: &'static str, e: AgentError) -> RuntimeError {
        match e {
            AgentError::Status {
                kind, message, pid, ..
            } => RuntimeError::refused(self.id, op, kind, message, pid),
            other => self.unreachable(other),
        }
    }

    /// A stream from the agent, its errors in core's terms.
    pub fn stream<T: Send + 'static>(
        &self,
        stream: impl futures_util::Stream<Item = Result<T, AgentError>> + Send + 'static,
    ) -> BoxStream<'static, Result<T, RuntimeError>> {
        forkbox_core::runtime::agent_stream(self.id, stream)
    }

    /// An exec-like call's events.
    pub fn events(
        &self,
        op: &'static str,
        res: Result<EventStream, AgentError>,
    ) -> Result<AgentEvents, RuntimeError> {
        match res {
            Ok(stream) => Ok(self.stream(stream)),
            Err(e) => Err(self.failed(op, e)),
        }
    }

    pub async fn exec(&self, req: &ExecRequest) -> Result<AgentEvents, RuntimeError> {
        self.events("exec", self.client.exec(req).await)
    }

    pub async fn run_code(&self, req: &RunCodeRequest) -> Result<AgentEvents, RuntimeError> {
        self.events("run_code", self.client.run_code(req).await)
    }

    pub async fn bg_start(&self, req: &ExecRequest) -> Result<BgInfo, RuntimeError> {
        self.client
            .bg_start(req)
            .await
            .map_err(|e| self.failed("background command", e))
    }

    pub async fn bg_list(&self) -> Result<Vec<BgInfo>, RuntimeError> {
        self.client
            .bg_list()
            .await
            .map_err(|e| self.failed("background command", e))
    }

    pub async fn bg_stdin(&self, pid: i32, data: Bytes, close: bool) -> Result<(), RuntimeError> {
        self.client
            .bg_stdin(pid, data, close)
            .await
            .map_err(|e| self.failed("background command", e))
    }

    pub async fn bg_signal(&self, pid: i32, signal: i32) -> Result<(), RuntimeError> {
        self.client
            .bg_signal(pid, signal)
            .await
            .map_err(|e| self.failed("background command", e))
    }

    pub async fn bg_wait(&self, pid: i32) -> Result<i32, RuntimeError> {
        self.client
            .bg_wait(pid)
            .await
            .map_err(|e| self.failed("background command", e))
    }

    pub async fn bg_output(&self, pid: i32, follow: bool) -> Result<AgentEvents, RuntimeError> {
        self.events(
            "background command",
            self.client.bg_output(pid, follow).await,
        )
    }

    pub async fn file_op(&self, op: &FileOp) -> Result<FileOpReply, RuntimeError> {
        self.client
            .file_op(op)
            .await
            .map_err(|e| self.failed("file operation", e))
    }

    pub async fn read_file(&self, path: &str) -> Result<(Option<u64>, ByteStream), RuntimeError> {
        let (size, stream) = self
            .client
            .read_file(path)
            .await
            .map_err(|e| self.failed("file operation", e))?;
        Ok((size, self.stream(stream)))
    }

    pub async fn write_file(
        &self,
        path: &str,
        data: UploadStream,
    ) -> Result<WriteReply, RuntimeError> {
        self.client
            .write_file(path, boxed_errors(data))
            .await
            .map_err(|e| self.failed("file operation", e))
    }

    pub async fn watch(&self, path: &str, recursive: bool) -> Result<WatchEvents, RuntimeError> {
        let stream = self
            .client
            .watch(path, recursive)
            .await
            .map_err(|e| self.failed("file operation", e))?;
        Ok(self.stream(stream))
    }

    pub async fn pty(
        &self,
        req: &PtyRequest,
        input: UploadStream,
    ) -> Result<ByteStream, RuntimeError> {
        let stream = self
            .client
            .pty(req, boxed_errors(input))
            .await
            .map_err(|e| self.failed("terminal", e))?;
        Ok(self.stream(stream))
    }

    pub async fn tcp(&self, port: u16, input: UploadStream) -> Result<ByteStream, RuntimeError> {
        let stream = self
            .client
            .tcp(port, boxed_errors(input))
            .await
            .map_err(|e| self.failed("port connection", e))?;
        Ok(self.stream(stream))
    }

    pub async fn ports(&self) -> Result<Vec<ListeningPort>, RuntimeError> {
        self.client
            .ports()
            .await
            .map_err(|e| self.failed("port connection", e))
    }
}

/// An upload's errors as the agent client takes them.
fn boxed_errors(
    s: UploadStream,
) -> impl futures_util::Stream<Item = Result<Bytes, BoxError>> + Send + 'static {
    s.map(|r| r.map_err(|e| Box::new(e) as BoxError))
}
