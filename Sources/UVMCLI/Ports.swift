import ArgumentParser
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Settings
import Wire

struct Ports: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ports",
        abstract: "List the guest ports forwarded to this host's localhost.",
        discussion: """
            A TCP server listening in the VM on 0.0.0.0, ::, 127.0.0.1 or ::1 is reachable on the same port at the host's 127.0.0.1 and ::1 within about a second (localhost forwarding; UVM_LOCALHOST_FORWARDING=0 turns it off). Forwarded ports listen on the host's loopback only. A port that another host program already uses is listed with the reason it is not forwarded.

            From the guest, the host's own loopback services are at 10.0.2.2.
            """)
    @OptionGroup var format: FormatOption

    func run() throws {
        var ports: [ForwardedPort] = []
        if let conn = DaemonConnection.connect(path: Paths.current().socket) {
            ports = try conn.call(PortsRequest())
        }
        if format.format == .json {
            return try printJSON(ports)
        }
        guard !ports.isEmpty else {
            print("no forwarded ports")
            return
        }
        var rows = [["PORT", "DISTRO", "PID", "PROCESS", "GUEST", "HOST"]]
        for p in ports {
            let host = p.hostAddresses.isEmpty ? "-" : p.hostAddresses.joined(separator: ",")
            rows.append(["\(p.port)", p.guest.distro ?? "-", p.guest.pid.map { "\($0)" } ?? "-", p.guest.process ?? "-",
                         p.guest.addresses.joined(separator: ","), host + (p.error.map { "  (not forwarded: \($0))" } ?? "")])
        }
        let widths = (0..<rows[0].count - 1).map { c in rows.map { $0[c].count }.max()! }
        for r in rows {
            let cells = r.enumerated().map { i, v in i < widths.count ? v + String(repeating: " ", count: widths[i] - v.count) : v }
            print(cells.joined(separator: "  "))
        }
    }
}
