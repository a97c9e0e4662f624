//! Framing of control messages between the coordinator and its workers: a big-endian `u32`
//! length, then the message as JSON (readable in a packet capture; control traffic is small).

use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Control messages above this are refused (a deployment spec is a few kilobytes).
const MAX_MESSAGE: u32 = 64 << 20;

/// Writes one message, length and body in one write (one segment on a no-delay socket).
pub async fn write<W: AsyncWrite + Unpin, M: Serialize>(out: &mut W, message: &M) -> std::io::Result<()> {
    let mut frame = vec![0u8; 4];
    serde_json::to_writer(&mut frame, message).map_err(std::io::Error::other)?;
    let len = u32::try_from(frame.len() - 4)
        .ok()
        .filter(|len| *len <= MAX_MESSAGE)
        .ok_or_else(|| std::io::Error::other(format!("a control message of {} bytes is too large", frame.len() - 4)))?;
    frame[..4].copy_from_slice(&len.to_be_bytes());
    out.write_all(&frame).await?;
    out.flush().await
}

/// Reads one message; an error at a clean end of the connection is `UnexpectedEof`.
pub async fn read<R: AsyncRead + Unpin, M: DeserializeOwned>(input: &mut R) -> std::io::Result<M> {
    let len = input.read_u32().await?;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!(
            "a control message of {len} bytes is refused"
        )));
    }
    let mut bytes = vec![0u8; len as usize];
    input.read_exact(&mut bytes).await?;
    serde_json::from_slice(&bytes).map_err(std::io::Error::other)
}
