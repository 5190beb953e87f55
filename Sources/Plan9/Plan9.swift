// Plan9: uvm's 9P2000.L file server, exporting one host directory per `Plan9Server`.
//
// Serving a session (uvmd): make a `Plan9Server(export:)` once per share, then for each byte stream
// (a unix socket or the virtio-serial relay) call `server.configure(channel:)` from the channel's
// initializer, or `try await server.serve(channel:)`, or `serve(connectedSocket:)` /
// `serve(input:output:)` for raw descriptors. Sessions are independent: a malformed message ends
// only its own (logged at error level).
//
// Files:
//   P9Protocol.swift   wire constants and message types
//   P9Codec.swift      encoding, bounds-checked decoding, the little-endian length framing
//   Plan9Server.swift  public API, the per-connection handler (tags, Tflush, back-pressure, msize)
//   Plan9Session.swift the fid table and every operation (runs on the thread pool)
//   HostFS.swift       the only code that touches the host file system; qid mapping
//   Plan9Client.swift  a small pipelining client (tests, benchmarks, fuzz seeds)
//   Plan9Fuzz.swift    the fuzz target (scripts/fuzz-9p.sh)
//
// Decisions worth knowing:
// - Confinement. Each fid holds an O_PATH fd. Walks open one validated component at a time with
//   openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS) (openat+O_NOFOLLOW on older kernels), so a symlink
//   is reached as itself and never traversed; ".." at the export root stays there, elsewhere the
//   result is checked to still lie under the root. Every create/remove/rename/link is an *at() call
//   on a directory fd with a single-component name. No guest-influenced path string is resolved.
// - Opening for I/O re-opens the fid's own inode through /proc/self/fd/N (relative to an fd of
//   /proc/self/fd), only for regular files and directories, with O_NONBLOCK, and checks dev/ino
//   afterwards. The magic link names exactly our fd's inode; symlink fds are never used this way.
//   FIFOs, sockets and device nodes are never opened (EPERM); lcreate is always O_EXCL on the host
//   and opens an existing name only after checking it is a regular file.
// - xattrs: fgetxattr does not work on O_PATH fds, so the path form on /proc/self/fd/N is used,
//   for regular files and directories only. Only user.* crosses (security.*, trusted.*, system.*
//   mean something to the host kernel); user.uvm.* is reserved for the server.
// - Ownership. Files belong to the user running the server; chown to anyone else is EPERM and
//   setuid/setgid bits never reach the host. With `metadata`, guest uid/gid/mode live in the
//   user.uvm.stat xattr (WSL's idea). mknod: without metadata, regular files, FIFOs and sockets are
//   created (inert: never opened by us), device nodes refused; with metadata every special file is
//   an empty regular host file whose type and rdev live in the xattr.
// - qid.path = 16-bit device index << 48 | inode, with a counter fallback for huge inode numbers,
//   so paths stay unique across the file systems under one share. qid.version is 0 (the Linux
//   client would otherwise treat a modified file as a new inode).
// - Readdir offsets are the host's d_off cookies (lseek + getdents64 per call): valid between calls.
// - Locks are OFD locks on the fid's open file, never blocking (the client retries on BLOCKED).
// - Replies are never msize bytes or more (the Linux client rejects them); reads and readdir are
//   clamped, anything else too big becomes ERANGE.
// - Unknown fid: EBADF (diod says EIO, QEMU ENOENT). Tauth: ENOENT, libnpclient's "no auth
//   required", so diod's tools work against this server.
