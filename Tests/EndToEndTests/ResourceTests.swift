import Foundation
import Testing

extension EndToEnd {
    /// What the VM takes from the host: swap (WSL's [wsl2] swap), each in a VM of its own.
    @Suite struct ResourceTests {
        func withHome(_ name: String, _ body: (String) throws -> Void) throws {
            let home = "/tmp/uvm-res-\(getpid())-\(name)"
            try? FileManager.default.removeItem(atPath: home)
            defer {
                Harness.stopDaemon(home: home)
                try? FileManager.default.removeItem(atPath: home)
            }
            try body(home)
        }

        /// 512 MB of memory and 1 GB of swap: a process touching 900 MiB completes instead of being
        /// OOM-killed, the guest sees the swap, and uvm status reports it.
        @Test func swapLetsAProcessUseMoreThanTheMemory() throws {
            try withHome("swap") { home in
                let env = ["UVM_MEMORY_MB": "512", "UVM_SWAP": "1GB"]
                let r = try Harness.run(["exec", "--", "sh", "-c",
                                         "grep -E 'MemTotal|SwapTotal' /proc/meminfo; dd if=/dev/zero of=/dev/null bs=900M count=1 2>/dev/null && echo touched"],
                                        home: home, env: env, timeout: 600)
                #expect(r.status == 0, "\(r.err)")
                #expect(r.out.contains("touched"), "\(r.out) \(r.err)")
                let swapKiB = r.out.split(separator: "\n").first { $0.hasPrefix("SwapTotal:") }
                    .flatMap { Int($0.split(separator: " ", omittingEmptySubsequences: true)[1]) } ?? 0
                #expect(swapKiB > 1_000_000, "\(r.out)")
                let status = try Harness.run(["status", "--format", "json"], home: home, env: env)
                let json = try #require(try JSONSerialization.jsonObject(with: status.stdout) as? [String: Any])
                #expect((json["guestSwapTotalKiB"] as? Int ?? 0) > 1_000_000, "\(status.out)")
                // The swap file is sparse: it takes on the host what the guest has swapped, not 1 GB.
                var st = stat()
                #expect(stat("\(home)/data/swap.img", &st) == 0 && st.st_size == 1 << 30)
            }
        }

        /// swap = 0: no swap in the guest, and no swap file on the host.
        @Test func swapZeroMeansNone() throws {
            try withHome("noswap") { home in
                let r = try Harness.run(["exec", "--", "sh", "-c", "grep SwapTotal /proc/meminfo; tail -n +2 /proc/swaps | wc -l"],
                                        home: home, env: ["UVM_SWAP": "0"], timeout: 300)
                #expect(r.status == 0, "\(r.err)")
                #expect(r.out.contains("SwapTotal:             0 kB") && r.out.hasSuffix("0\n"), "\(r.out)")
                #expect(!FileManager.default.fileExists(atPath: "\(home)/data/swap.img"))
                let text = try Harness.run(["status"], home: home, env: ["UVM_SWAP": "0"])
                #expect(text.out.contains("swap:    none"), "\(text.out)")
            }
        }
    }
}
