// Expectations about thrown AttentionErrors, shared by the error and core tests (and
// by later conformers' tests).

import EfficientAttention
import Testing

/// Runs `body` and returns the AttentionError it throws (nil if it throws nothing or
/// something else; an issue is recorded).
func thrownAttentionError<R>(_ body: () throws -> R, sourceLocation: SourceLocation = #_sourceLocation) -> AttentionError? {
    do {
        _ = try body()
        Issue.record("expected an AttentionError, nothing was thrown", sourceLocation: sourceLocation)
        return nil
    } catch let error as AttentionError {
        return error
    } catch {
        Issue.record("expected an AttentionError, got \(error)", sourceLocation: sourceLocation)
        return nil
    }
}

/// The case of an AttentionError, without its message.
enum AttentionErrorCase: Equatable { case shapeMismatch, invalidShape, invalidParameter, unsupported, sizeOverflow }

extension AttentionError {
    var errorCase: AttentionErrorCase {
        switch self {
        case .shapeMismatch: .shapeMismatch
        case .invalidShape: .invalidShape
        case .invalidParameter: .invalidParameter
        case .unsupported: .unsupported
        case .sizeOverflow: .sizeOverflow
        }
    }
}

/// Expects `body` to throw an AttentionError of `kind` whose message contains every
/// string in `mentions`.
func expectAttentionError<R>(_ kind: AttentionErrorCase, mentioning mentions: [String], _ label: String = "",
                             sourceLocation: SourceLocation = #_sourceLocation, _ body: () throws -> R) {
    guard let error = thrownAttentionError(body, sourceLocation: sourceLocation) else { return }
    #expect(error.errorCase == kind, "\(label): expected \(kind), got \(error)", sourceLocation: sourceLocation)
    for word in mentions {
        #expect(error.message.contains(word), "\(label): message \"\(error.message)\" should name \"\(word)\"",
                sourceLocation: sourceLocation)
    }
}
