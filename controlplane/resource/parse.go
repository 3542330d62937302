package resource

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"sigs.k8s.io/yaml"
)

// maxDepth bounds the nesting of objects and lists in a document. Valid
// documents nest only a few levels.
const maxDepth = 64

// rawDoc is one document of the input: its generic value (map[string]any,
// []any, string, json.Number, bool or nil) or the error that kept it from
// being read.
type rawDoc struct {
	value any
	err   string
}

// chunk is the text of one YAML document and the input line it starts on.
type chunk struct {
	text []byte
	line int
}

// splitInput turns the input into documents. Input whose first character is
// '[' is a JSON array of documents; input that is one valid JSON object is one
// document; anything else is YAML, split on "---" lines. Empty documents are
// dropped.
func splitInput(data []byte) []rawDoc {
	data = bytes.TrimPrefix(data, []byte("\xef\xbb\xbf"))
	trimmed := bytes.TrimSpace(data)
	switch {
	case len(trimmed) == 0:
		return nil
	case trimmed[0] == '[':
		v, err := parseJSON(data, "")
		if err != nil {
			return []rawDoc{{err: "invalid JSON: " + err.Error()}}
		}
		list, ok := v.([]any)
		if !ok {
			return []rawDoc{{err: "invalid JSON: expected a list of objects"}}
		}
		docs := make([]rawDoc, len(list))
		for i, v := range list {
			docs[i] = rawDoc{value: v}
		}
		return docs
	case trimmed[0] == '{' && json.Valid(trimmed):
		v, err := parseJSON(data, "")
		if err != nil {
			return []rawDoc{{err: "invalid JSON: " + err.Error()}}
		}
		return []rawDoc{{value: v}}
	}
	var docs []rawDoc
	for _, c := range splitYAML(data) {
		v, err := yamlToValue(c)
		if err != nil {
			docs = append(docs, rawDoc{err: err.Error()})
			continue
		}
		if v == nil {
			continue // empty, or only comments
		}
		docs = append(docs, rawDoc{value: v})
	}
	return docs
}

// splitYAML splits YAML text on document markers: lines that start with
// "---" (or "...") followed by nothing, white space or a comment. Content after the
// separator on the same line starts the next document, as in YAML.
func splitYAML(data []byte) []chunk {
	var (
		chunks []chunk
		cur    = chunk{line: 1}
		line   = 1
	)
	for len(data) > 0 {
		var l []byte
		if i := bytes.IndexByte(data, '\n'); i >= 0 {
			l, data = data[:i+1], data[i+1:]
		} else {
			l, data = data, nil
		}
		if rest, ok := separator(l); ok {
			chunks = append(chunks, cur)
			cur = chunk{text: rest, line: line}
			if rest == nil {
				cur.line++ // the document starts on the next line
			}
		} else {
			cur.text = append(cur.text, l...)
		}
		line++
	}
	return append(chunks, cur)
}

// separator reports whether l is a document separator line and returns what
// follows the marker on it (without a trailing comment).
func separator(l []byte) ([]byte, bool) {
	rest, ok := bytes.CutPrefix(l, []byte("---"))
	if !ok {
		// "..." ends a document; what follows starts another one. Treating it
		// as a separator keeps the YAML parser from silently dropping it.
		if rest, ok = bytes.CutPrefix(l, []byte("...")); !ok {
			return nil, false
		}
	}
	if len(rest) > 0 && rest[0] != ' ' && rest[0] != '\t' && rest[0] != '\r' && rest[0] != '\n' {
		return nil, false
	}
	rest = bytes.TrimSpace(rest)
	if len(rest) == 0 || rest[0] == '#' {
		return nil, true
	}
	return append(append([]byte(nil), rest...), '\n'), true
}

var yamlLine = regexp.MustCompile(`\bline (\d+):`)

// yamlToValue converts one YAML document to a generic value, reporting
// syntax errors with line numbers of the whole input. Duplicate keys are
// refused.
func yamlToValue(c chunk) (v any, err error) {
	if len(bytes.TrimSpace(c.text)) == 0 {
		return nil, nil
	}
	// The YAML parser is third-party code fed untrusted input: turn a panic
	// into an error rather than take the caller down.
	defer func() {
		if r := recover(); r != nil {
			v, err = nil, fmt.Errorf("invalid YAML (starting at line %d): the parser failed: %v", c.line, r)
		}
	}()
	j, err := yaml.YAMLToJSONStrict(c.text)
	if err != nil {
		msg := strings.TrimPrefix(err.Error(), "error converting YAML to JSON: ")
		msg = yamlLine.ReplaceAllStringFunc(msg, func(m string) string {
			n, convErr := strconv.Atoi(m[len("line ") : len(m)-1])
			if convErr != nil {
				return m
			}
			return "line " + strconv.Itoa(n+c.line-1) + ":"
		})
		return nil, errors.New("invalid YAML: " + strings.Join(strings.Fields(msg), " "))
	}
	v, err = parseJSON(j, "")
	if err != nil {
		return nil, fmt.Errorf("invalid YAML (starting at line %d): %v", c.line, err)
	}
	return v, nil
}

// parseJSON decodes one JSON value into generic values, keeping numbers as
// json.Number, refusing duplicate keys (naming them under path) and nesting
// deeper than maxDepth.
func parseJSON(data []byte, path string) (any, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	v, err := parseValue(dec, data, path, 0)
	if err != nil {
		return nil, err
	}
	if _, err := dec.Token(); err != io.EOF {
		return nil, fmt.Errorf("%s: unexpected data after the value", position(data, dec.InputOffset()))
	}
	return v, nil
}

func parseValue(dec *json.Decoder, data []byte, path string, depth int) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, jsonError(data, err)
	}
	d, ok := tok.(json.Delim)
	if !ok {
		return tok, nil
	}
	if depth >= maxDepth {
		return nil, fmt.Errorf("%s: nested more than %d levels deep", orDocument(path), maxDepth)
	}
	switch d {
	case '{':
		m := map[string]any{}
		for dec.More() {
			kt, err := dec.Token()
			if err != nil {
				return nil, jsonError(data, err)
			}
			k, ok := kt.(string)
			if !ok {
				return nil, fmt.Errorf("%s: object key is not a string", position(data, dec.InputOffset()))
			}
			p := field(path, k)
			if _, dup := m[k]; dup {
				return nil, fmt.Errorf("%s: duplicate field", p)
			}
			v, err := parseValue(dec, data, p, depth+1)
			if err != nil {
				return nil, err
			}
			m[k] = v
		}
		if _, err := dec.Token(); err != nil {
			return nil, jsonError(data, err)
		}
		return m, nil
	case '[':
		list := []any{}
		for i := 0; dec.More(); i++ {
			v, err := parseValue(dec, data, index(path, i), depth+1)
			if err != nil {
				return nil, err
			}
			list = append(list, v)
		}
		if _, err := dec.Token(); err != nil {
			return nil, jsonError(data, err)
		}
		return list, nil
	}
	return nil, fmt.Errorf("%s: unexpected %q", position(data, dec.InputOffset()), d)
}

func orDocument(path string) string {
	if path == "" {
		return "document"
	}
	return path
}

// jsonError adds a line and column to JSON syntax errors.
func jsonError(data []byte, err error) error {
	if se, ok := errors.AsType[*json.SyntaxError](err); ok {
		return fmt.Errorf("%s: %v", position(data, se.Offset), se)
	}
	if err == io.EOF {
		return errors.New("unexpected end of input")
	}
	return err
}

// position renders a byte offset as "line L, column C".
func position(data []byte, off int64) string {
	if off < 0 {
		off = 0
	}
	if off > int64(len(data)) {
		off = int64(len(data))
	}
	before := data[:off]
	line := bytes.Count(before, []byte("\n")) + 1
	col := len(before) - bytes.LastIndexByte(before, '\n')
	return fmt.Sprintf("line %d, column %d", line, col)
}
