import CLibvirt
import Foundation
import NIOPosix

/// A C pointer that libvirt allows to be used from any thread (virConnectPtr, virDomainPtr: libvirt's
/// public objects are reference counted and locked internally).
struct LibvirtHandle: @unchecked Sendable {
    let pointer: OpaquePointer
}

/// Process-wide libvirt set-up: the default event loop on its own thread, and error reporting.
enum LibvirtRuntime {
    private static let started: Void = {
        // libvirt prints every error to stderr by default; we turn them into Swift errors instead.
        virSetErrorFunc(nil, { _, _ in })
        // Must happen before the first virConnectOpen, or that connection gets no events,
        // keepalive or close notification.
        if virEventRegisterDefaultImpl() != 0 {
            fatalError("virEventRegisterDefaultImpl failed: \(LibvirtError.last(operation: "start event loop", uri: nil))")
        }
        let thread = Thread {
            // Dispatches lifecycle callbacks, keepalive and connection-close for every connection.
            while true {
                if virEventRunDefaultImpl() != 0 {
                    virResetLastError()
                    usleep(10_000)  // do not spin if the loop keeps failing
                }
            }
        }
        thread.name = "libvirt-events"
        thread.start()
    }()

    /// Idempotent; every libvirt entry point calls it first.
    static func start() { started }

    /// Runs a blocking libvirt call off Swift's cooperative pool (virDomainCreateXML takes ~0.5 s
    /// or more). The body should build its error with `LibvirtError.last` itself, on the thread
    /// that failed.
    static func blocking<T: Sendable>(_ body: @escaping @Sendable () throws -> T) async throws -> T {
        try await NIOThreadPool.singleton.runIfActive(body)
    }

    /// nil when libvirt at `uri` offers kvm domains for x86_64 QEMU, else why not. Synchronous.
    static func kvmDomainProblem(uri: String) -> String? {
        start()
        guard let conn = virConnectOpen(uri) else {
            return "cannot ask libvirt: \(LibvirtError.last(operation: "connect", uri: uri, opening: true))"
        }
        defer { virConnectClose(conn) }
        guard let caps = virConnectGetDomainCapabilities(conn, nil, "x86_64", nil, "kvm", 0) else {
            return "libvirt offers no kvm domains: \(LibvirtError.last(operation: "domain capabilities", uri: uri).message)"
        }
        defer { free(caps) }
        return String(cString: caps).contains("<domain>kvm</domain>")
            ? nil : "libvirt's domain capabilities for kvm do not list a kvm domain"
    }
}
