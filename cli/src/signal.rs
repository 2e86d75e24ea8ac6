//! Shutdown signals: Ctrl-C everywhere; SIGTERM on Unix (service managers, `kill`); on Windows
//! also Ctrl-Break, closing the console window, logging off and shutting down, each of which
//! Windows gives a console program a few seconds to react to.

/// Resolves on Ctrl-C, or SIGTERM on Unix, or a console close/break/logoff/shutdown event on
/// Windows.
pub async fn shutdown() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    tokio::select! {
        _ = ctrl_c => tracing::info!("Ctrl-C: shutting down"),
        reason = other() => tracing::info!("{reason}: shutting down"),
    }
}

/// The platform's other ways of asking a program to stop; never resolves where there are none.
#[cfg(unix)]
async fn other() -> &'static str {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut s) => {
            s.recv().await;
            "SIGTERM"
        }
        Err(_) => std::future::pending().await,
    }
}

#[cfg(windows)]
async fn other() -> &'static str {
    use tokio::signal::windows;
    // A listener that cannot be installed just never fires.
    macro_rules! event {
        ($listen:path) => {
            async {
                match $listen() {
                    Ok(mut s) => {
                        s.recv().await;
                    }
                    Err(_) => std::future::pending::<()>().await,
                }
            }
        };
    }
    tokio::select! {
        _ = event!(windows::ctrl_break) => "Ctrl-Break",
        _ = event!(windows::ctrl_close) => "console closed",
        _ = event!(windows::ctrl_logoff) => "logoff",
        _ = event!(windows::ctrl_shutdown) => "system shutdown",
    }
}

#[cfg(not(any(unix, windows)))]
async fn other() -> &'static str {
    std::future::pending().await
}
