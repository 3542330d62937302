package token

import (
	"encoding/base32"
	"strings"
)

// IDLength is the length of a token ID in bytes.
const IDLength = 16

// ID names a token in `strait federation token list` and `token revoke ID`
// and in the issuer's store. It is random and carries no secret.
type ID [IDLength]byte

// idEncoding is RFC 4648 base32 in lower case without padding: 26
// characters, no symbols, easy to read aloud and to paste in a shell.
var idEncoding = base32.NewEncoding("abcdefghijklmnopqrstuvwxyz234567").WithPadding(base32.NoPadding)

// IDStringLength is the length of ID.String.
const IDStringLength = 26

// String returns the ID as 26 lower-case base32 characters.
func (id ID) String() string { return idEncoding.EncodeToString(id[:]) }

// IsZero reports whether id is the zero ID, which no token has.
func (id ID) IsZero() bool { return id == ID{} }

// MarshalText implements encoding.TextMarshaler with the String form.
func (id ID) MarshalText() ([]byte, error) { return []byte(id.String()), nil }

// UnmarshalText implements encoding.TextUnmarshaler with ParseID.
func (id *ID) UnmarshalText(b []byte) error {
	v, err := ParseID(string(b))
	if err != nil {
		return err
	}
	*id = v
	return nil
}

// ParseID parses the String form of an ID. Surrounding white space is
// trimmed and upper case is accepted (IDs get retyped); anything else that is
// not exactly the canonical 26 characters of a non-zero ID is refused with
// ReasonMalformed.
func ParseID(s string) (ID, error) {
	s = strings.TrimSpace(s)
	if len(s) != IDStringLength {
		return ID{}, fail(ReasonMalformed, "token ID must be %d characters, got %d", IDStringLength, len(s))
	}
	s = strings.ToLower(s)
	var id ID
	// Decode checks the alphabet (but skips line breaks, which the length
	// and the re-encoding below rule out); re-encoding rules out non-zero
	// trailing bits, so each ID has exactly one spelling.
	if n, err := idEncoding.Decode(id[:], []byte(s)); err != nil || n != IDLength || id.String() != s {
		return ID{}, fail(ReasonMalformed, "token ID %q is not %d base32 characters (a-z, 2-7)", s, IDStringLength)
	}
	if id.IsZero() {
		return ID{}, fail(ReasonMalformed, "token ID is all zeros")
	}
	return id, nil
}
