import ArgumentParser
import Glibc
import Logging
import NIOCore
import NIOPosix
import Plan9

#if UVM_FUZZ
/// The fuzzing build (scripts/fuzz-9p.sh): libFuzzer's driver takes over the command line.
@main
enum FuzzMain {
    static func main() {
        var argc = CommandLine.argc
        var argv = CommandLine.unsafeArgv
        exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
            Plan9Fuzz.testOneInput(UnsafeRawBufferPointer(start: data, count: size))
        })
    }
}

@_silgen_name("LLVMFuzzerRunDriver")
func LLVMFuzzerRunDriver(
    _ argc: UnsafeMutablePointer<Int32>,
    _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> Int32
) -> Int32
#else
/// The 9P server on its own: for tests, fuzzing and benchmarks (uvmd embeds the same server).
@main
struct UVM9P: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "uvm-9p",
        abstract: "uvm's 9P2000.L file server, standalone.",
        subcommands: [Serve.self, FuzzReplay.self],
        defaultSubcommand: Serve.self
    )
}

#endif

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Export a directory over 9P2000.L on a unix socket, a connected fd, or stdin/stdout.",
        discussion: """
            Linux guests mount it with: mount -t 9p -o trans=fd,rfdno=R,wfdno=W,version=9p2000.L,msize=1048576 none /mnt
            (or trans=unix for --socket).
            """
    )

    @Argument(help: "The directory to export.")
    var path: String

    @Flag(help: "Refuse every change with EROFS.")
    var readOnly = false

    @Flag(help: "Keep guest uid/gid/mode in user.* xattrs (WSL's metadata option).")
    var metadata = false

    @Option(help: "Listen on this unix socket; every connection is a session.")
    var socket: String?

    @Option(help: "Serve one session on this connected socket (or bidirectional) descriptor.")
    var fd: Int32?

    @Flag(help: "Serve one session on stdin/stdout.")
    var stdio = false

    @Option(help: "Threads for file system calls.")
    var threads: Int = 16

    @Option(help: "Log level (trace, debug, info, notice, warning, error, critical).")
    var logLevel: String = "info"

    func validate() throws {
        let modes = [socket != nil, fd != nil, stdio].filter { $0 }.count
        guard modes == 1 else { throw ValidationError("Give exactly one of --socket, --fd, --stdio.") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("Unknown log level \(logLevel).") }
    }

    func run() async throws {
        LoggingSystem.bootstrap { StreamLogHandler.standardError(label: $0) }
        var logger = Logger(label: "uvm-9p")
        logger.logLevel = Logger.Level(rawValue: logLevel) ?? .info
        let pool = NIOThreadPool(numberOfThreads: max(1, threads))
        pool.start()
        let server = try Plan9Server(export: Plan9Export(root: path, readOnly: readOnly, metadata: metadata),
                                     threadPool: pool, logger: logger)
        // (The descriptor limit is raised with the first session: Budget.processDescriptors.)
        if let socket {
            let listener = try server.listen(unixSocketPath: socket)
            logger.info("serving \(path) on \(socket)")
            try await listener.closed()
        } else if let fd {
            var st = stat()
            if fstat(fd, &st) == 0, st.st_mode & S_IFMT == S_IFSOCK {
                try await server.serve(connectedSocket: fd)
            } else {
                try await server.serve(input: fd, output: fd)
            }
        } else {
            try await server.serve(input: 0, output: 1)
        }
        try await pool.shutdownGracefully()
    }
}

/// Runs fuzz inputs (crash reproducers, the seed corpus) through the fuzz target without libFuzzer.
struct FuzzReplay: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "fuzz-replay", abstract: "Run fuzz inputs through the fuzz target.", shouldDisplay: false)

    @Argument(help: "Input files.")
    var files: [String]

    func run() throws {
        for file in files {
            guard let f = fopen(file, "rb") else { throw ValidationError("cannot open \(file)") }
            var bytes: [UInt8] = []
            var buf = [UInt8](repeating: 0, count: 65536)
            while true {
                let n = fread(&buf, 1, buf.count, f)
                if n <= 0 { break }
                bytes += buf[0..<n]
            }
            fclose(f)
            _ = bytes.withUnsafeBytes { Plan9Fuzz.testOneInput($0) }
            print("ok \(file)")
        }
    }
}

