import Testing
import Wire

/// `uvm mount`'s operations on both links.
@Suite struct FilesOperationTests {
    @Test func filesRequestsRoundTrip() throws {
        let daemon: [DaemonRequest] = [.files(FilesRequest(distro: "debian", user: "me")), .files(FilesRequest())]
        for r in daemon { #expect(try Frame.json(.request, r).decodeRequest(DaemonRequest.self, who: "test") == r) }
        let guest = GuestRequest.serveFiles(ServeFilesRequest(distro: "debian", distroDisk: "uvm-debian", user: nil))
        #expect(try Frame.json(.request, guest).decodeRequest(GuestRequest.self, who: "test") == guest)
        let ready = ServeFilesReady(user: "me", uid: 1000, gid: 1000)
        #expect(try Frame.json(.event, ready).decode(ServeFilesReady.self) == ready)
    }

    @Test func theOperationNamesAreTheirOwn() {
        #expect(DaemonRequest.files(FilesRequest()).op == "files")
        #expect(GuestRequest.serveFiles(ServeFilesRequest(distro: "a", distroDisk: "uvm-a")).op == "serveFiles")
    }
}
