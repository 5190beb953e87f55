import Glibc
import Synchronization

/// A count a guest may use up (descriptors, bytes held for it), so that a hostile or broken session
/// runs out of its own allowance, with an error it can see, before the process runs out of anything.
/// A budget may draw on a parent shared with other sessions (the process's descriptors).
final class Budget: Sendable {
    let limit: Int
    let error: Int32
    let parent: Budget?
    private let used = Atomic<Int>(0)

    init(limit: Int, error: Int32, parent: Budget? = nil) {
        self.limit = limit
        self.error = error
        self.parent = parent
    }

    var inUse: Int { used.load(ordering: .relaxed) }

    /// `n` more, or the budget's errno (the parent's if that one is exhausted). Given back by the
    /// lease's deinit, so every path that drops what it bought returns it.
    func lease(_ n: Int = 1) throws(P9Errno) -> Lease {
        try take(n)
        return Lease(self, n)
    }

    private func take(_ n: Int) throws(P9Errno) {
        if used.add(n, ordering: .relaxed).newValue > limit {
            used.subtract(n, ordering: .relaxed)
            throw P9Errno(error)
        }
        do throws(P9Errno) {
            try parent?.take(n)
        } catch {
            used.subtract(n, ordering: .relaxed)
            throw error
        }
    }

    fileprivate func give(_ n: Int) {
        used.subtract(n, ordering: .relaxed)
        parent?.give(n)
    }

    /// Descriptors all 9P sessions of the process may hold together: three quarters of the soft
    /// limit (raised to the hard limit first), so the rest of the process (uvmd's CLI socket,
    /// accepting new sessions, QEMU's sockets) always has some left.
    static let processDescriptors: Budget = {
        var lim = rlimit()
        var soft = 1024
        if getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim) == 0 {
            // NIO uses epoll, so no select() limit stands in the way of more than 1024.
            let want = min(lim.rlim_max, 1 << 16)
            if lim.rlim_cur < want {
                lim.rlim_cur = want
                _ = setrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim)
                _ = getrlimit(Int32(RLIMIT_NOFILE.rawValue), &lim)
            }
            soft = Int(min(lim.rlim_cur, 1 << 20))
        }
        return Budget(limit: soft * 3 / 4, error: EMFILE)
    }()
}

/// Part of a budget, given back when the last holder lets go.
final class Lease: Sendable {
    private let budget: Budget
    private let amount: Int

    fileprivate init(_ budget: Budget, _ amount: Int) {
        self.budget = budget
        self.amount = amount
    }

    deinit { budget.give(amount) }
}
