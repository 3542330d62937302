package token

import (
	"errors"
	"fmt"
)

// Reason classifies why a token was refused, in a short, bounded word
// suitable as a metric label or an audit-log field.
type Reason string

// Reasons for refusing a token. Parse and Check produce the first seven; the
// issuer's store produces the others with Errorf.
const (
	ReasonMalformed          Reason = "malformed"           // not a well-formed token
	ReasonTruncated          Reason = "truncated"           // part of the token is missing
	ReasonTampered           Reason = "tampered"            // integrity check failed: edited or corrupted
	ReasonUnsupportedVersion Reason = "unsupported_version" // made by a newer strait
	ReasonExpired            Reason = "expired"             // past its expiry
	ReasonNotYetValid        Reason = "not_yet_valid"       // issued in the future (clock skew)
	ReasonWrongCluster       Reason = "wrong_cluster"       // for another cluster, or the issuer itself
	ReasonRevoked            Reason = "revoked"             // revoked by the issuer
	ReasonSuperseded         Reason = "superseded"          // replaced by a newer token
	ReasonAlreadyUsed        Reason = "already_used"        // redeemed before (tokens are one-time)
	ReasonUnknown            Reason = "unknown"             // the issuer has no record of the ID
	ReasonBadProof           Reason = "bad_proof"           // redemption proof did not verify
)

// phrases complete "federation: join token ..." for each reason.
var phrases = map[Reason]string{
	ReasonMalformed:          "is malformed",
	ReasonTruncated:          "is truncated (was it copied whole?)",
	ReasonTampered:           "was tampered with or corrupted",
	ReasonUnsupportedVersion: "was made by a newer strait",
	ReasonExpired:            "has expired",
	ReasonNotYetValid:        "is not valid yet",
	ReasonWrongCluster:       "is for another cluster",
	ReasonRevoked:            "was revoked",
	ReasonSuperseded:         "was superseded by a newer token",
	ReasonAlreadyUsed:        "already used",
	ReasonUnknown:            "is unknown to the issuer",
	ReasonBadProof:           "proof of possession did not verify",
}

// Error is returned for every refused token. Its message starts with
// "federation: join token" and the reason's phrase, followed by the detail.
// errors.Is(err, ErrX) holds when err is an *Error with the reason of
// sentinel ErrX; Unwrap returns the underlying cause, if any (for example
// identity.ErrInvalid for a bad cluster name).
type Error struct {
	Reason Reason
	detail string
	cause  error
}

// Sentinels, one per reason, for errors.Is.
var (
	ErrMalformed          = &Error{Reason: ReasonMalformed}
	ErrTruncated          = &Error{Reason: ReasonTruncated}
	ErrTampered           = &Error{Reason: ReasonTampered}
	ErrUnsupportedVersion = &Error{Reason: ReasonUnsupportedVersion}
	ErrExpired            = &Error{Reason: ReasonExpired}
	ErrNotYetValid        = &Error{Reason: ReasonNotYetValid}
	ErrWrongCluster       = &Error{Reason: ReasonWrongCluster}
	ErrRevoked            = &Error{Reason: ReasonRevoked}
	ErrSuperseded         = &Error{Reason: ReasonSuperseded}
	ErrAlreadyUsed        = &Error{Reason: ReasonAlreadyUsed}
	ErrUnknown            = &Error{Reason: ReasonUnknown}
	ErrBadProof           = &Error{Reason: ReasonBadProof}
)

// ErrInvalidParams is wrapped by every error New returns for bad Params.
var ErrInvalidParams = errors.New("federation: invalid join token parameters")

func (e *Error) Error() string {
	phrase, ok := phrases[e.Reason]
	if !ok {
		phrase = "refused (" + string(e.Reason) + ")"
	}
	msg := "federation: join token " + phrase
	if e.detail != "" {
		msg += ": " + e.detail
	}
	return msg
}

// Unwrap returns the underlying cause, or nil.
func (e *Error) Unwrap() error { return e.cause }

// Is reports whether target is the sentinel of e's reason (an *Error with the
// same Reason and no detail).
func (e *Error) Is(target error) bool {
	t, ok := target.(*Error)
	return ok && t.detail == "" && t.cause == nil && t.Reason == e.Reason
}

// Errorf returns an *Error with reason r and a detail formatted in the
// operator's terms. A %w verb in format makes the wrapped error its cause.
// The issuer's store uses it for the reasons only it can see:
//
//	token.Errorf(token.ReasonAlreadyUsed, "token %s was redeemed by %q at %s", id, by, at)
func Errorf(r Reason, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	return &Error{Reason: r, detail: err.Error(), cause: errors.Unwrap(err)}
}

func fail(r Reason, format string, args ...any) error {
	return Errorf(r, format, args...)
}

// ReasonOf returns the Reason of err, or "" if err is not a token error.
func ReasonOf(err error) Reason {
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	return ""
}
