import Foundation
import Testing

extension EndToEnd {
    /// Wrong input gets one clear line and a non-zero exit.
    @Suite struct BadInputTests {
        /// A state directory of its own, so that a broken set-up does not touch the main test VM.
        func withHome(_ name: String, _ body: (String) throws -> Void) rethrows {
            let home = "/tmp/uvm-bad-\(getpid())-\(name)"
            defer {
                Harness.stopDaemon(home: home)
                try? FileManager.default.removeItem(atPath: home)
            }
            try body(home)
        }

        @Test func unknownFlag() throws {
            let r = try Harness.run(["exec", "--no-such-flag", "--", "true"])
            #expect(r.status != 0)
            #expect(r.err.contains("no-such-flag"))
            let top = try Harness.run(["--bogus"])
            #expect(top.status != 0)
            #expect(top.err.contains("bogus"))
        }

        @Test func missingCommand() throws {
            let r = try Harness.run(["exec", "--"])
            #expect(r.status != 0)
            #expect(r.err.contains("no command given"))
        }

        @Test func unknownDistro() throws {
            let r = try Harness.run(["exec", "--distro", "nosuchdistro", "--", "true"])
            #expect(r.status == 125)
            #expect(r.err.contains("no distro 'nosuchdistro'"))
            #expect(r.err.split(separator: "\n").count == 1)
        }

        @Test func commandNotFoundInTheGuest() throws {
            let r = try Harness.run(["exec", "--", "no-such-command-xyz"])
            #expect(r.status == 127)
            #expect(r.err.contains("no-such-command-xyz"))
        }

        @Test func kernelNotBuilt() throws {
            try withHome("kernel") { home in
                let r = try Harness.run(["exec", "--", "true"], home: home, env: ["UVM_KERNEL": "/nonexistent/bzImage"])
                #expect(r.status == 125)
                #expect(r.err.contains("kernel is not built"))
                #expect(r.err.contains("make kernel"))
                #expect(r.err.split(separator: "\n").count == 1)
            }
        }

        @Test func libvirtNotRunning() throws {
            try withHome("libvirt") { home in
                // A libvirt URI whose daemon socket does not exist is what a stopped libvirtd looks like.
                let r = try Harness.run(["exec", "--", "true"], home: home,
                                        env: ["UVM_LIBVIRT_URI": "qemu:///system?socket=/nonexistent/libvirt-sock"])
                #expect(r.status == 125)
                #expect(r.err.contains("libvirt is not running"))
                #expect(r.err.contains("libvirtd"))
                #expect(r.err.split(separator: "\n").count == 1)
            }
        }

        @Test func doctorExplainsWhatIsMissing() throws {
            let ok = try Harness.run(["doctor"])
            #expect(ok.status == 0, "doctor: \(ok.out)")
            #expect(ok.out.contains("kernel"))
            let broken = try Harness.run(["doctor", "--format", "json"], env: ["UVM_KERNEL": "/nonexistent/bzImage"])
            #expect(broken.status != 0)
            let checks = try #require(try JSONSerialization.jsonObject(with: broken.stdout) as? [[String: Any]])
            let kernel = try #require(checks.first { $0["name"] as? String == "kernel" })
            #expect(kernel["ok"] as? Bool == false)
            #expect(kernel["fix"] as? String == "make kernel")
        }
    }
}
