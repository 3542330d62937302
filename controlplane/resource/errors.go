package resource

import (
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"strings"
)

// ErrEmpty is returned by Decode when the input holds no documents.
var ErrEmpty = errors.New("resource: no objects in input (it is empty or holds only comments and '---' separators)")

// maxFieldErrors bounds how many problems are listed for one document.
const maxFieldErrors = 100

// FieldError is one problem with one field of a document.
type FieldError struct {
	// Path names the field as in "spec.retries.attempts" or
	// "spec.from[1].spiffeID". It is empty when the problem concerns the
	// document as a whole, such as a syntax error.
	Path string
	// Message says what is wrong, e.g. "must be between 0 and 10, got 11".
	Message string
}

// String returns "path: message", or the message alone when there is no path.
func (e FieldError) String() string {
	if e.Path == "" {
		return e.Message
	}
	return e.Path + ": " + e.Message
}

// Error reports every problem found in one document.
type Error struct {
	// Doc is the 1-based index of the document in the input (documents that
	// are empty are not counted); 0 when the object did not come from Decode.
	Doc int
	// Kind, Namespace and Name identify the object as far as they are known.
	Kind, Namespace, Name string
	// Fields lists the problems, in the order they were found.
	Fields []FieldError
}

// Error names the document and lists its problems, one per line when there
// are several.
func (e *Error) Error() string {
	var b strings.Builder
	subject := e.subject()
	if subject != "" {
		b.WriteString(subject)
		b.WriteString(": ")
	}
	switch len(e.Fields) {
	case 0:
		b.WriteString("invalid")
	case 1:
		b.WriteString(e.Fields[0].String())
	default:
		fmt.Fprintf(&b, "%d errors:", len(e.Fields))
		for _, f := range e.Fields {
			b.WriteString("\n  ")
			b.WriteString(f.String())
		}
	}
	return b.String()
}

func (e *Error) subject() string {
	var id []string
	if e.Kind != "" {
		id = append(id, printable(e.Kind))
	}
	if e.Name != "" {
		if e.Namespace != "" {
			id = append(id, printable(e.Namespace)+"/"+printable(e.Name))
		} else {
			id = append(id, printable(e.Name))
		}
	}
	who := strings.Join(id, " ")
	switch {
	case e.Doc > 0 && who != "":
		return fmt.Sprintf("document %d (%s)", e.Doc, who)
	case e.Doc > 0:
		return fmt.Sprintf("document %d", e.Doc)
	}
	return who
}

var plainWord = regexp.MustCompile(`^[A-Za-z0-9._-]{1,63}$`)

// printable returns s if it is a short plain word, or a quoted and truncated
// form of it otherwise, so that hostile input cannot garble messages.
func printable(s string) string {
	if plainWord.MatchString(s) {
		return s
	}
	return quote(s)
}

// quote quotes s for a message, truncating long values.
func quote(s string) string {
	const limit = 64
	if len(s) > limit {
		return strconv.Quote(s[:limit]) + "..."
	}
	return strconv.Quote(s)
}

// fieldErrors collects the problems of one document.
type fieldErrors struct {
	list    []FieldError
	dropped int
}

// add records a problem unless one is already recorded for the same path
// (a field with the wrong type is not also reported as missing).
func (f *fieldErrors) add(path, format string, args ...any) {
	for _, e := range f.list {
		if e.Path == path {
			return
		}
	}
	if len(f.list) >= maxFieldErrors {
		f.dropped++
		return
	}
	f.list = append(f.list, FieldError{Path: path, Message: fmt.Sprintf(format, args...)})
}

func (f *fieldErrors) empty() bool { return len(f.list) == 0 }

// done returns the collected problems, noting any that were left out.
func (f *fieldErrors) done() []FieldError {
	if f.dropped > 0 {
		return append(f.list, FieldError{Message: fmt.Sprintf("%d more errors not shown", f.dropped)})
	}
	return f.list
}

var simpleKey = regexp.MustCompile(`^[A-Za-z0-9_-]{1,64}$`)

// field returns the path of field name under path.
func field(path, name string) string {
	if !simpleKey.MatchString(name) {
		return path + "[" + quote(name) + "]"
	}
	if path == "" {
		return name
	}
	return path + "." + name
}

// mapKey returns the path of map entry k under path.
func mapKey(path, k string) string { return path + "[" + quote(k) + "]" }

// index returns the path of list element i under path.
func index(path string, i int) string { return path + "[" + strconv.Itoa(i) + "]" }
