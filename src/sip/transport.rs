//! IO shell: UDP/TCP sockets and timers driving the proxy core.
